/// QEMU's `isa-debug-exit`: a guest write of `v` stops the VM with status `v`.
///
/// Attach it at `0xf4..<0xf8` (QEMU: `-device isa-debug-exit,iobase=0xf4,iosize=4`).
/// Under QEMU the process exit status is `(v << 1) | 1`; ``StopReason/guestExit(status:)`` carries `v`.
/// It has no state and offers no fast path: a write stops the VM, which only an exit can do.
public final class DebugExitDevice: BusDevice, @unchecked Sendable {
    /// `debug-exit`.
    public let name = "debug-exit"
    /// Creates the device.
    public init() {}
    /// Reads return 0.
    public func read(offset: UInt64, size: Int) -> UInt64 { 0 }
    /// Any write stops the VM with the written value.
    public func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect {
        .stopVM(status: UInt32(truncatingIfNeeded: value))
    }
}

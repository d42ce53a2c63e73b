import CKVM

/// Measures the VMM's side of the exit path: the TSC cycles from `KVM_RUN`
/// returning to the next `KVM_RUN` call (decode, statistics, the exit chain,
/// the device). Attach one to a ``KVMVCPU`` (``KVMVCPU/exitPathProbe``) before
/// the VM starts; it stores samples into a buffer allocated up front, so
/// measuring allocates nothing.
public final class ExitPathProbe: @unchecked Sendable {
    private var buffer: UnsafeMutableBufferPointer<UInt64>
    private var count = 0
    private var lastReturn: UInt64 = 0

    /// The most samples a probe keeps: 2^24 (128 MiB of samples).
    public static let maximumCapacity = 1 << 24

    /// A probe that keeps up to `capacity` samples: 1 to ``maximumCapacity`` (clamped to that range), allocated now.
    public init(capacity: Int) {
        buffer = .allocate(capacity: min(max(1, capacity), ExitPathProbe.maximumCapacity))
        buffer.initialize(repeating: 0)
    }

    deinit { buffer.deallocate() }

    @inline(__always)
    func enter() {
        let now = ckvm_rdtsc()
        if lastReturn != 0, count < buffer.count {
            buffer[count] = now &- lastReturn
            count += 1
        }
    }

    @inline(__always)
    func leave() { lastReturn = ckvm_rdtsc() }

    /// The samples, in TSC cycles.
    public var samples: [UInt64] { Array(buffer[0..<count]) }

    /// The current TSC value.
    public static func timestamp() -> UInt64 { ckvm_rdtsc() }
}

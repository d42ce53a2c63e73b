import VMMKit

/// A device under test (``FastPathHarness``), in three copies, and what the harness needs to know about it.
public protocol FastPathSubject {
    /// The device type.
    associatedtype Device: BusDevice
    /// A fresh copy (fast, reference or direct), reset as a guest would find it.
    func make() -> Device
    /// Host-side work applied to every copy at once (a UART's input); `nil` for none.
    func hostAction(_ rng: inout SplitMix64) -> ((Device) -> Void)?
    /// Guest-visible state outside the registers, compared at the end (output, RAM).
    func observe(_ device: Device) -> [UInt64]
    /// Reads that probe the final registers, in order (they may have side effects; every copy gets the same).
    func finalProbe(_ device: Device) -> [UInt64]
    /// A random access of vCPU `vcpu` (vCPU 0 drives the device; others change its configuration).
    func access(vcpu: Int, _ rng: inout SplitMix64) -> GuestAccess
    /// A guest-visible value the guest reads without an exit (RAM a device writes), if any.
    func memoryRead(_ device: Device) -> UInt64?
    /// The fast paths to ask for: one request per register access, with the ring that feeds it, if any
    /// (the harness offers every read a shared slot, as DMP does).
    var requests: [FastPathRequest] { get }
    /// Hands the device the ring consumer's drain, if it takes one (a UART, before loopback goes on).
    func connect(_ device: Device, drain: @escaping @Sendable () -> Void)
}

extension FastPathSubject {
    /// By default no host action.
    public func hostAction(_ rng: inout SplitMix64) -> ((Device) -> Void)? { nil }
    /// By default nothing outside the registers.
    public func observe(_ device: Device) -> [UInt64] { [] }
    /// By default nothing the guest reads without an exit.
    public func memoryRead(_ device: Device) -> UInt64? { nil }
    /// By default the device takes no drain.
    public func connect(_ device: Device, drain: @escaping @Sendable () -> Void) {}
}

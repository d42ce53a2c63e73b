/// The rings' kick register: a port (or MMIO word) a producer writes to make
/// the VMM look at the rings now. The write exits, and the VMM applies every
/// entry published before it first (``PVRingDevice`` drains before any exit
/// is handled), then wakes a sleeping poller. A synchronous producer whose
/// bounded wait ran out kicks instead of repeating its access (its entry is
/// already published). Reads return 0.
public final class PVRingKick: BusDevice, @unchecked Sendable {
    /// `pvring-kick`.
    public let name = "pvring-kick"
    /// The rings it kicks (DMP finds the kick register of the rings it appends to by this). Weak: the
    /// rings hold the bus, whose tables hold this register, so a strong reference made a cycle that
    /// leaked the bus and every device on it with each VM (LeakSanitizer).
    package private(set) weak var rings: PVRingDevice?

    /// A kick register for `rings`.
    public init(rings: PVRingDevice) { self.rings = rings }

    /// Reads 0.
    public func read(offset: UInt64, size: Int) -> UInt64 { 0 }

    /// Wakes the poller; the drain already happened before the exit reached the bus.
    public func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect {
        rings?.noteKick()
        return .none
    }
}

/// A zone of guest addresses whose writes the kernel batches into a ring
/// instead of exiting (`KVM_REGISTER_COALESCED_MMIO`).
public struct CoalescedZone: Hashable, Sendable {
    /// The first address (or port).
    public var address: UInt64
    /// The size in bytes.
    public var size: UInt32
    /// `true` for port I/O, `false` for MMIO.
    public var isPIO: Bool
    /// Creates a zone.
    public init(address: UInt64, size: UInt32, isPIO: Bool) { self.address = address; self.size = size; self.isPIO = isPIO }
}

/// One write the kernel batched in a coalesced zone instead of exiting.
public struct CoalescedWrite: Hashable, Sendable {
    /// Port I/O or MMIO.
    public var space: BusSpace
    /// The port or guest-physical address.
    public var address: UInt64
    /// The width in bytes (1 to 8).
    public var size: Int
    /// The value written.
    public var value: UInt64
    /// Creates a write record.
    public init(space: BusSpace, address: UInt64, size: Int, value: UInt64) {
        self.space = space; self.address = address; self.size = size; self.value = value
    }
}

/// Flags of a guest memory slot.
public struct MemorySlotFlags: OptionSet, Hashable, Sendable {
    /// The raw `KVM_MEM_*` bits.
    public let rawValue: UInt32
    /// Creates flags from raw bits.
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `KVM_MEM_LOG_DIRTY_PAGES`: track written pages (read with ``VMBackend/dirtyLog(slot:pageCount:)``).
    public static let logDirtyPages = MemorySlotFlags(rawValue: 1)
    /// `KVM_MEM_READONLY`: guest writes exit as MMIO writes; reads are served from memory.
    public static let readOnly = MemorySlotFlags(rawValue: 2)
}

/// A guest memory slot: guest-physical range → host memory.
public struct MemorySlot: Hashable, @unchecked Sendable {
    /// The slot number.
    public var slot: UInt32
    /// Slot flags.
    public var flags: MemorySlotFlags
    /// The guest-physical range.
    public var range: GuestRange
    /// The host memory backing it (`nil` with size 0 deletes the slot).
    public var host: UnsafeMutableRawPointer?

    /// Creates a memory slot description.
    public init(slot: UInt32, flags: MemorySlotFlags = [], range: GuestRange, host: UnsafeMutableRawPointer?) {
        self.slot = slot; self.flags = flags; self.range = range; self.host = host
    }
}

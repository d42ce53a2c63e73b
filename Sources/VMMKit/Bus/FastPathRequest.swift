import CKVM

/// One register access DMP asks a device about: where, how wide, which way,
/// the ring (if any) whose consumer writes to this register, and the shared
/// slot (if any) the device may keep current for a read.
public struct FastPathRequest: Hashable, Sendable {
    /// The register's offset in the device's range.
    public var offset: UInt64
    /// The access width in bytes (1, 2, 4 or 8).
    public var size: Int
    /// Read or write.
    public var direction: AccessDirection
    /// The index of a ring whose entries are applied to this register, if one
    /// exists. A device can offer ``FastPathKind/ringAppend(ring:mode:)`` only
    /// for this ring.
    public var ring: Int?
    /// For a read: a slot the device may keep current with the register's value
    /// (``FastPathSlot``). A device can offer ``FastPathKind/sharedSlotRead(slot:)``
    /// only for this slot (its ``FastPathSlot/index``).
    public var slot: FastPathSlot?

    /// Creates a request.
    public init(offset: UInt64, size: Int, direction: AccessDirection, ring: Int? = nil, slot: FastPathSlot? = nil) {
        self.offset = offset; self.size = size; self.direction = direction; self.ring = ring; self.slot = slot
    }
}

/// A fast path a device granted for one register access.
public struct FastPathDescription: Hashable, Sendable {
    /// What the guest may do instead of exiting.
    public var kind: FastPathKind
    /// The register's offset in the device's range.
    public var offset: UInt64
    /// The access width in bytes.
    public var size: Int
    /// Read or write.
    public var direction: AccessDirection
    /// For a read: whether it may be served while entries the guest appended
    /// to rings of this device are still pending. When `false` the stub serves
    /// it only while those rings are empty and exits otherwise. Always `false`
    /// for writes.
    public var independentOfPendingRingEntries: Bool

    /// Creates a description.
    public init(kind: FastPathKind, offset: UInt64, size: Int, direction: AccessDirection,
                independentOfPendingRingEntries: Bool = false) {
        self.kind = kind; self.offset = offset; self.size = size; self.direction = direction
        self.independentOfPendingRingEntries = direction == .read && independentOfPendingRingEntries
    }

    /// A description for `request` with `kind`.
    public init(_ kind: FastPathKind, for request: FastPathRequest, independentOfPendingRingEntries: Bool = false) {
        self.init(kind: kind, offset: request.offset, size: request.size, direction: request.direction,
                  independentOfPendingRingEntries: independentOfPendingRingEntries)
    }
}

/// Why the bus did not grant a fast path (``IOBus/grantFastPath(space:address:size:direction:ring:slot:enableWord:)``).
public enum FastPathRefusal: Error, Hashable, Sendable, CustomStringConvertible {
    /// The width is not 1, 2, 4 or 8.
    case unsupportedSize(Int)
    /// No device is attached at the address.
    case unclaimed
    /// The access runs past the end of the device's range.
    case crossesRangeEnd
    /// The register is covered by an ioeventfd or a coalesced zone: the kernel handles it.
    case kernelHandled(KernelHandledKind)
    /// The device offers no fast path for this access (a read with side effects, a write that stops the VM, ...).
    case declined(device: String)
    /// The device answered with a description that does not fit the request
    /// (another offset, width or direction; a read kind for a write; a ring or slot it was not offered).
    case invalidDeclaration(device: String)

    /// A one-line description.
    public var description: String {
        switch self {
        case .unsupportedSize(let s): "no fast path for \(s)-byte accesses"
        case .unclaimed: "no device at that address"
        case .crossesRangeEnd: "the access runs past the end of the device's range"
        case .kernelHandled(let k): "the register is under a \(k.rawValue)"
        case .declined(let d): "device '\(d)' offers no fast path for this access"
        case .invalidDeclaration(let d): "device '\(d)' declared a fast path that does not fit the request"
        }
    }
}

/// An address range whose accesses the kernel handles without an exit.
public enum KernelHandledKind: String, Hashable, Sendable {
    /// `KVM_IOEVENTFD`: writes signal an eventfd.
    case ioeventfd
    /// `KVM_REGISTER_COALESCED_MMIO`: writes are batched in a kernel ring.
    case coalescedZone = "coalesced zone"
}

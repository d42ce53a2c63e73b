/// How the guest may serve one access to a device register itself, from
/// shared memory, instead of exiting (DESIGN.md, DMP step 3).
///
/// The core only carries these descriptions; the DMP module acts on them.
public enum FastPathKind: Hashable, Sendable {
    /// A read that always returns this value while the fast path is enabled
    /// (a status register, e.g. a UART's "transmitter empty").
    case constantRead(UInt64)
    /// A read of a shared slot that the device keeps current.
    case sharedSlotRead(slot: Int)
    /// A write that has no effect and may be dropped (e.g. port 0x80 delays).
    case discardWrite
    /// A write appended to a shared-memory ring and applied later, in order,
    /// by the ring consumer (UART transmit, doorbells).
    case ringAppend
    /// A read of a counter derived from the TSC: `value = (tsc * multiplier) >> shift`.
    case tscCounter(multiplier: UInt64, shift: UInt8)
}

/// A device's declaration of a fast path for one register access.
public struct FastPathDescription: Hashable, Sendable {
    /// What the guest may do instead of exiting.
    public var kind: FastPathKind
    /// The register's offset in the device's range.
    public var offset: UInt64
    /// The access width in bytes.
    public var size: Int
    /// Read or write.
    public var direction: AccessDirection
    /// Whether the device's current state makes the fast path exact. A device
    /// re-evaluates this whenever its state changes (for a UART: DLAB clear,
    /// no loopback, no pending input); DMP mirrors it into the per-site
    /// enable word of the implant.
    public var enabled: Bool

    /// Creates a fast-path description.
    public init(kind: FastPathKind, offset: UInt64, size: Int, direction: AccessDirection, enabled: Bool) {
        self.kind = kind; self.offset = offset; self.size = size; self.direction = direction; self.enabled = enabled
    }
}

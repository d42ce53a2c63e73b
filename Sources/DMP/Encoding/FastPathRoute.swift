import VMMKit

/// One fast path an implanted body serves: the access it matches at run time
/// and what it does instead of exiting (DESIGN.md, DMP steps 3 and 4).
///
/// Every address here is *guest-virtual*, as the implanted code uses it
/// (the implant is reached through the guest's own mappings, checked by a page
/// walk); the body addresses data RIP-relatively, so it runs wherever it is placed.
package struct FastPathRoute: Hashable, Sendable {
    /// What the patched instruction must access at run time for this route to apply.
    package enum Target: Hashable, Sendable {
        /// An I/O port (`in`/`out`, with the port from `dx` or an immediate).
        case port(UInt16)
        /// A memory operand whose effective address (linear, as computed from the
        /// registers at run time) equals this value.
        case memory(UInt64)
    }

    /// The access the route serves; any other runtime port or address executes the original instruction.
    package var target: Target
    /// The access width in bytes (1, 2, 4; 8 only for reads of constants and slots).
    package var width: Int
    /// Read or write.
    package var direction: AccessDirection
    /// What the device granted.
    package var kind: FastPathKind
    /// The 32-bit enable word (implant data page): nonzero means the fast path is exact now.
    package var enableWord: UInt64
    /// A 64-bit counter the body increments each time it serves the access (`lock inc` with ``lockedCounters``,
    /// else a plain `inc`).
    package var hitCounter: UInt64
    /// Whether the body updates its hit counter and its ring's wait counter with locked instructions, so that
    /// vCPUs running the same body at the same time lose no count (``DMPConfiguration/lockedCounters``).
    package var lockedCounters = false
    /// For ``FastPathKind/ringAppend(ring:mode:)``: where the ring is mapped.
    package var ring: RingMapping?
    /// For ``FastPathKind/sharedSlotRead(slot:)``: the slot's address (`width` bytes).
    package var slot: UInt64?
    /// For a read the device did not declare independent of its pending ring
    /// entries (``FastPathDescription/independentOfPendingRingEntries``): the
    /// device's rings. The body serves the read only while every one of them is
    /// empty (hint equal to the consumer index, the slot there not published)
    /// and executes the original instruction otherwise.
    package var pendingRings: [RingMapping]

    /// Creates a route.
    package init(target: Target, width: Int, direction: AccessDirection, kind: FastPathKind,
                 enableWord: UInt64, hitCounter: UInt64, ring: RingMapping? = nil, slot: UInt64? = nil,
                 pendingRings: [RingMapping] = []) {
        self.target = target; self.width = width; self.direction = direction; self.kind = kind
        self.enableWord = enableWord; self.hitCounter = hitCounter; self.ring = ring; self.slot = slot
        self.pendingRings = pendingRings
    }
}

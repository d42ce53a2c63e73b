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

/// A paravirtual ring (``PVRingLayout``) as implanted code sees it.
package struct RingMapping: Hashable, Sendable {
    /// The ring header's guest-virtual address (the producer hint is at offset 0).
    package var base: UInt64
    /// Slots in the ring (a power of two ≥ 2).
    package var slotCount: UInt32
    /// Whether the producer waits, bounded, until its entry is applied (``RingAppendMode/synchronous``).
    package var synchronous: Bool
    /// The bound on the producer's claim loop (retries, waits on a full ring while a consumer polls);
    /// past it the original instruction runs.
    package var spinLimit: UInt32
    /// The bound on a synchronous producer's wait for the consumer index to pass its entry;
    /// past it the producer writes ``kick`` (its entry is already published).
    package var synchronousWaitLimit: UInt32
    /// The rings' kick register (``PVRingKick``): a port or a guest-virtual MMIO address whose
    /// write exits and makes the VMM drain the rings and wake a sleeping poller. Every producer
    /// writes it after publishing when the header's wake flag (``PVRingLayout/wakeFlag``) is set,
    /// as `Guests/include/ring.inc` does. `nil`: no kick; a synchronous producer whose wait ran
    /// out just goes on (the entry is applied at the next exit, drain or timer).
    package var kick: FastPathRoute.Target?
    /// For a synchronous producer: a 64-bit counter (guest-virtual, implant data page) to which each append
    /// adds the iterations its wait for the consumer took (at most ``synchronousWaitLimit``; `lock add` when
    /// the route's ``FastPathRoute/lockedCounters`` is set, else a plain `add`), so verification sees time
    /// spent waiting that causes no exit. `nil`: not counted.
    package var waitCounter: UInt64?

    /// Creates a mapping.
    package init(base: UInt64, slotCount: UInt32, synchronous: Bool, spinLimit: UInt32 = 4096,
                 synchronousWaitLimit: UInt32 = 1 << 16, kick: FastPathRoute.Target? = nil, waitCounter: UInt64? = nil) {
        self.base = base; self.slotCount = slotCount; self.synchronous = synchronous; self.spinLimit = spinLimit
        self.synchronousWaitLimit = synchronousWaitLimit; self.kick = kick; self.waitCounter = waitCounter
    }
}

import VMMKit

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

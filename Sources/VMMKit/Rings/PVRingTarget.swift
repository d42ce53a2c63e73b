/// The device register a ring's entries are written to, and how.
public struct PVRingTarget: Hashable, Sendable {
    /// Port I/O or MMIO.
    public var space: BusSpace
    /// The port or guest-physical address.
    public var address: UInt64
    /// The value width in bytes (1, 2 or 4): each entry is written as an access of this size, its value masked to it.
    public var width: Int
    /// Whether appends are synchronous (the producer waits until its entry is
    /// applied: the device's work is visible without an exit, like the
    /// doorbell's completions in RAM) or asynchronous (UART output).
    public var synchronous: Bool

    /// Creates a target.
    public init(space: BusSpace, address: UInt64, width: Int = 1, synchronous: Bool = false) {
        self.space = space; self.address = address; self.width = width; self.synchronous = synchronous
    }
}

/// Whether the ring consumer polls, and for how long it keeps polling after
/// the last entry (the model is io_uring's SQPOLL thread and its `sq_thread_idle`).
public struct PVRingPolling: Hashable, Sendable {
    /// Whether a polling thread runs beside the vCPUs.
    public var enabled: Bool
    /// How long the poller keeps polling after it last found an entry before it sleeps.
    public var idleNanoseconds: UInt64
    /// Spin-wait hints (`pause`) between two looks at the rings (at least 1):
    /// larger values let entries arrive in longer runs (fewer cache-line
    /// transfers between producer and poller) and add that much latency to a
    /// synchronous append.
    public var spinsBetweenChecks: Int

    /// No polling thread: rings drain before exits, at stop and from the drain timer.
    public static let disabled = PVRingPolling(enabled: false, idleNanoseconds: 0)
    /// A polling thread that sleeps after `idleNanoseconds` without entries (default 2 ms).
    public static func enabled(idleNanoseconds: UInt64 = 2_000_000, spinsBetweenChecks: Int = 16) -> PVRingPolling {
        PVRingPolling(enabled: true, idleNanoseconds: idleNanoseconds, spinsBetweenChecks: spinsBetweenChecks)
    }

    /// Creates a configuration.
    public init(enabled: Bool, idleNanoseconds: UInt64, spinsBetweenChecks: Int = 16) {
        self.enabled = enabled; self.idleNanoseconds = idleNanoseconds; self.spinsBetweenChecks = spinsBetweenChecks
    }
}

/// Counters of one ring (``PVRingDevice/statistics(ring:)``).
public struct PVRingStatistics: Hashable, Sendable {
    /// Entries applied to the target device.
    public var consumed: Int = 0
    /// Batches handed to the device.
    public var batches: Int = 0
    /// Holes healed: free slots skipped because the producer hint was already past them.
    public var holes: Int = 0
    /// Times a drain found a free slot at the consumer index with the hint more
    /// than a ring ahead (a hostile or broken producer): nothing is skipped then.
    public var invalidHints: Int = 0
    /// Producer fallbacks: exits writing the ring's target register while
    /// entries are pending or once the rings have carried entries (or a
    /// producer attached): a producer that performed the original access
    /// instead of appending (or an access no producer serves yet). Each is
    /// also counted below by what the VMM found when the exit arrived, before
    /// it drained (a consumer that caught up meanwhile leaves it in neither).
    public var fallbacks: Int = 0
    /// Fallbacks that found the ring full (the consumer was behind: off its CPU, or asleep).
    public var fallbacksRingFull: Int = 0
    /// Fallbacks that found the ring not full while the polling consumer had
    /// gone idle (asleep, or woken and not yet running): a producer that saw
    /// the wake flag or no polling flag.
    public var fallbacksConsumerIdle: Int = 0
}

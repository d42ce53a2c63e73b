import VMMKit

/// What a steady phase's ring-related exits were (``PVRingStatistics`` summed over the rings, and the poller's
/// sleeps): a producer's fallbacks by what they found, and kicks of an idle poller.
struct RingCounters: Sendable, Equatable {
    var fallbacks = 0
    var ringFull = 0
    var consumerIdle = 0
    var kicks = 0
    var pollerSleeps = 0

    init() {}

    /// The counters of `rings` now.
    init(_ rings: PVRingDevice) {
        for i in rings.targets.indices {
            let s = rings.statistics(ring: i)
            fallbacks += s.fallbacks
            ringFull += s.fallbacksRingFull
            consumerIdle += s.fallbacksConsumerIdle
        }
        kicks = rings.kicks
        pollerSleeps = rings.pollerSleeps
    }

    /// The counts from `start` to `self`.
    func since(_ start: RingCounters) -> RingCounters {
        var d = RingCounters()
        d.fallbacks = fallbacks - start.fallbacks
        d.ringFull = ringFull - start.ringFull
        d.consumerIdle = consumerIdle - start.consumerIdle
        d.kicks = kicks - start.kicks
        d.pollerSleeps = pollerSleeps - start.pollerSleeps
        return d
    }

    var json: JSONValue {
        .object([("fallbacks", .int(fallbacks)), ("ring_full", .int(ringFull)), ("consumer_idle", .int(consumerIdle)),
                 ("kicks", .int(kicks)), ("poller_sleeps", .int(pollerSleeps))])
    }
}

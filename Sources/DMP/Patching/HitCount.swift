import VMMKit

/// What DMP believes of one site's hit counter (DESIGN.md, DMP step 7).
///
/// The counter is a 64-bit word in the implant's data page that the stub
/// increments after serving an access; the page is writable by the guest, so
/// its value is bad input. Each observation accepts the counter's change since
/// the previous one only if it is plausible:
///
/// - it did not decrease (wrapping: a decrease reads as an enormous increase);
/// - it is at most one hit per nanosecond between the two readings (a stub
///   serves an access in several instructions and an `inc` of memory; no vCPU
///   does more than one per nanosecond), measured from a timestamp taken
///   before the previous reading to one taken after this one;
/// - for a ring-append fast path, the total since the patch is at most the
///   entries the ring's consumer has applied since the patch (read after the
///   counter, from before the patch went live) plus the ring's slot count:
///   every hit published one entry before it was counted, and at most
///   `slotCount` published entries are not consumed yet. This is a bound
///   from work the VMM observed, not from time.
///
/// The first implausible change makes the counter *untrusted* for the rest of
/// the patch's life: ``counted`` stays at the last plausible total (a lower
/// bound of the accesses served, never an inflated one, as long as the guest's
/// writes were implausible), the report says so, and verification stops using
/// it. A guest that writes plausible values (a slow, steady increase) is not
/// detected: for constant-read and discard fast paths the only bound is then
/// one hit per nanosecond; for ring appends it is the ring's consumed count.
/// Either way the counter only steers the report and verification, never what
/// the guest observes.
///
/// A synchronous ring append also has a *wait counter*, the word after the hit
/// counter, to which each append adds the iterations it waited for the consumer
/// (at most the wait limit) before it counts its hit. Its change is accepted
/// under the same rules: it did not decrease, it is at most one iteration per
/// nanosecond (each iteration holds a `pause`), and its total since the patch
/// is at most the wait limit times the hits counted plus a few appends in
/// flight (the counter is read before the hit counter). An implausible wait
/// counter makes the whole site untrusted. A guest that raises it plausibly can
/// only make its own patch look slower (undone, then retried after back-off).
package struct HitCount: Sendable {
    /// The counter's guest-physical address.
    package let counter: GuestAddress
    /// For a ring-append fast path, the ring whose consumed count bounds the hits.
    package let ring: Int?
    /// The ring's slot count (entries published but not consumed yet, at most).
    private let slotCount: UInt64
    /// The ring's consumed count read before the patch went live.
    private let consumedAtPatch: Int
    /// The counter at the last plausible reading.
    private var last: UInt64 = 0
    /// A time taken before the last plausible reading.
    private var lastAt: ContinuousClock.Instant
    /// Hits accepted since the patch.
    package private(set) var counted: UInt64 = 0
    /// Why the counter stopped being believed, once it did.
    package private(set) var distrust: String?
    /// For a synchronous ring append: the wait counter's guest-physical address.
    package let waitCounter: GuestAddress?
    /// The most iterations one append adds to the wait counter.
    private let waitLimit: UInt64
    /// The wait counter at the last plausible reading.
    private var lastWaits: UInt64 = 0
    /// Wait iterations accepted since the patch.
    package private(set) var waited: UInt64 = 0
    /// Appends that may have added their wait but not yet counted their hit when the counters are read.
    static let appendsInFlight: UInt64 = 8

    /// A counter the planner just zeroed, for a patch not live yet (`now` is taken before it goes live).
    /// - Parameters:
    ///   - ring: the ring of a ring-append fast path, with its slot count and its consumed count now.
    ///   - waits: a synchronous append's wait counter (zeroed with the hit counter) and its wait limit.
    package init(counter: GuestAddress, ring: (index: Int, slotCount: UInt32, consumed: Int)?,
                 waits: (address: GuestAddress, limit: UInt32)? = nil, now: ContinuousClock.Instant = .now) {
        self.counter = counter
        self.waitCounter = waits?.address
        self.waitLimit = UInt64(waits?.limit ?? 0)
        self.ring = ring?.index
        self.slotCount = UInt64(ring?.slotCount ?? 0)
        self.consumedAtPatch = ring?.consumed ?? 0
        self.lastAt = now
    }

    /// Whether the counter is still believed.
    package var trusted: Bool { distrust == nil }

    /// Reads the counter and accepts its change if plausible; returns the hits counted so far.
    /// - Parameter consumed: a closure reading ring `ring`'s consumed count now (called after the counter is read).
    @discardableResult
    package mutating func observe(_ memory: GuestMemory, consumed: (Int) -> Int?) -> UInt64 {
        guard distrust == nil else { return counted }
        let before = ContinuousClock.now
        // The wait counter first: an append adds its wait before it counts its hit.
        var waits: UInt64?
        if let w = waitCounter {
            guard let v = try? memory.read(UInt64.self, at: w) else { return counted }
            waits = v
        }
        guard let value = try? memory.read(UInt64.self, at: counter) else { return counted }
        let delta = value &- last
        let elapsed = nanoseconds(from: lastAt, to: .now)
        if let waits {
            let d = waits &- lastWaits
            let bound = waitLimit.multipliedReportingOverflow(by: counted &+ min(delta, elapsed) &+ HitCount.appendsInFlight)
            if d > elapsed || (!bound.overflow && waited &+ d > bound.partialValue) {
                distrust = waits < lastWaits
                    ? "the guest wrote the wait counter (it went down from \(lastWaits) to \(waits))"
                    : "the guest wrote the wait counter (up \(d) in \(elapsed) ns; \(waited &+ d) iterations for "
                        + "\(counted &+ delta) appends of at most \(waitLimit) each)"
                return counted
            }
        }
        if delta > elapsed {
            distrust = value < last
                ? "the guest wrote the hit counter (it went down from \(last) to \(value))"
                : "the guest wrote the hit counter (up \(delta) in \(elapsed) ns, more than one per ns)"
            return counted
        }
        if let ring, let now = consumed(ring) {
            let bound = UInt64(max(0, now - consumedAtPatch)) &+ slotCount
            if counted &+ delta > bound {
                distrust = "the guest wrote the hit counter (\(counted &+ delta) hits, but ring \(ring) consumed only "
                    + "\(max(0, now - consumedAtPatch)) entries since the patch, with \(slotCount) slots)"
                return counted
            }
        }
        counted &+= delta
        last = value
        lastAt = before
        if let waits {
            waited &+= waits &- lastWaits
            lastWaits = waits
        }
        return counted
    }
}

/// Nanoseconds from `start` to `end` (0 if `end` is earlier).
func nanoseconds(from start: ContinuousClock.Instant, to end: ContinuousClock.Instant) -> UInt64 {
    let (s, a) = (end - start).components
    guard s >= 0, a >= 0 else { return 0 }
    return UInt64(s) &* 1_000_000_000 &+ UInt64(a / 1_000_000_000)
}

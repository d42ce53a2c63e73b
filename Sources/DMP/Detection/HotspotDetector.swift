import VMMKit

/// Counts exits per site and says when a site becomes hot: DMP's first stage
/// (DESIGN.md, "The DMP pipeline", step 1), usable alone as a profiler.
///
/// A site is an ``ExitSite``: the RIP reported at the exit and the access
/// (kind, port or guest-physical address, width, direction). The detector
/// keeps, per site, the exits of all time and those among the last
/// ``window`` exits it recorded (all sites together: an exact sliding window,
/// kept as a ring of the sites of the last ``window`` exits). A site whose
/// count in the window reaches ``threshold`` is reported *once* as a
/// candidate by ``record(_:)``; it is reported again only after
/// ``rearm(_:)`` (for a retry after back-off), and then as soon as its count
/// in the window is at the threshold again.
///
/// ## Cost
///
/// ``record(_:)`` allocates nothing and hashes nothing through `Hasher`
/// (SipHash): a multiplicative hash with a per-instance random seed (so a
/// guest cannot choose RIPs that collide in every VMM) into a fixed-size
/// open-addressing table, at most ``probeLimit`` slots visited, plus one
/// store into the window ring and one decrement of the site that leaves the
/// window. Measured with `minivmm detector-bench`.
///
/// The table holds at most ``capacity`` distinct sites and never forgets one
/// (a profiler wants all-time counts); exits at sites it cannot place, once
/// full or past the probe limit, are counted in ``untracked`` and never
/// become candidates.
///
/// ## Threads
///
/// One detector per vCPU: ``record(_:)`` is called on that vCPU's exit path
/// without locks (two vCPUs sharing one would race on the counts and the
/// ring, and a shared window would mix their exits). Read ``topSites(_:)``,
/// ``counts(of:)`` and the totals from another thread only while the vCPU
/// is stopped or paused. To profile a whole VM, merge the vCPUs' top sites.
public final class HotspotDetector: @unchecked Sendable {
    /// What the detector knows about one site.
    public struct Entry: Hashable, Sendable {
        /// The site.
        public var site: ExitSite
        /// Exits recorded at the site since the detector was created (or ``reset()``).
        public var total: Int
        /// Exits at the site among the last ``HotspotDetector/window`` exits.
        public var inWindow: Int
        /// Whether the site was reported as a candidate and not re-armed since.
        public var reported: Bool

        /// Creates an entry.
        public init(site: ExitSite, total: Int, inWindow: Int, reported: Bool) {
            self.site = site; self.total = total; self.inWindow = inWindow; self.reported = reported
        }
    }

    private struct Slot {
        var rip: UInt64
        var address: UInt64
        /// 0 = empty; else bit 63 | kind << 16 | size << 8 | direction (as ``ExitSiteTable``).
        var tag: UInt64
        var total: UInt64
        var inWindow: UInt32
        /// 1 = reported (not armed).
        var reported: UInt32
    }

    /// Exits a site must cause within ``window`` to become a candidate (1 to ``maximumWindow``).
    public let threshold: Int
    /// The sliding window, in exits recorded by this detector (all sites), ``threshold`` to ``maximumWindow``.
    public let window: Int
    /// The most distinct sites the detector holds (16 to ``maximumCapacity``).
    public let capacity: Int
    /// How many slots one lookup visits at most.
    public static let probeLimit = 32
    /// The largest ``window`` (and ``threshold``): 2^24 exits, a 64 MiB window ring.
    public static let maximumWindow = 1 << 24
    /// The largest ``capacity``: 2^21 sites, a table of 2^22 40-byte slots (160 MiB).
    public static let maximumCapacity = 1 << 21

    /// The number of distinct sites held.
    @exclusivity(unchecked) public private(set) var siteCount = 0
    /// Exits recorded (tracked or not).
    @exclusivity(unchecked) public private(set) var recorded = 0
    /// Exits at sites the table could not place (full, or the probe limit reached).
    @exclusivity(unchecked) public private(set) var untracked = 0
    /// Candidates reported so far (first reports and reports after re-arming).
    @exclusivity(unchecked) public private(set) var candidatesReported = 0

    private let slots: UnsafeMutablePointer<Slot>
    private let mask: Int
    private let seed: UInt64
    /// The slot index of each of the last `window` exits (`noSlot` for an untracked exit or an unused entry).
    private let ring: UnsafeMutablePointer<UInt32>
    @exclusivity(unchecked) private var ringPosition = 0
    private static let noSlot = UInt32.max

    /// Creates a detector. Each parameter is clamped to its range (``DMPConfiguration/validate()`` reports a
    /// configuration's threshold and window outside it instead).
    /// - Parameters:
    ///   - threshold: exits within the window that make a site a candidate: 1 to ``maximumWindow`` (values
    ///     below count as 1, above as ``maximumWindow``).
    ///   - window: the sliding window in exits: `threshold` to ``maximumWindow`` (raised to `threshold` when
    ///     smaller, lowered to ``maximumWindow`` when larger).
    ///   - capacity: the most distinct sites held: 16 to ``maximumCapacity`` (clamped). The table reserves twice
    ///     as many 40-byte slots, rounded up to a power of two; the ring 4 bytes per exit of the window.
    public init(threshold: Int, window: Int, capacity: Int = 4096) {
        self.threshold = min(max(1, threshold), HotspotDetector.maximumWindow)
        self.window = min(max(self.threshold, window), HotspotDetector.maximumWindow)
        self.capacity = min(max(16, capacity), HotspotDetector.maximumCapacity)
        var n = 16
        while n < 2 * self.capacity { n <<= 1 }
        mask = n - 1
        slots = .allocate(capacity: n)
        slots.initialize(repeating: Slot(rip: 0, address: 0, tag: 0, total: 0, inWindow: 0, reported: 0), count: n)
        ring = .allocate(capacity: self.window)
        ring.initialize(repeating: HotspotDetector.noSlot, count: self.window)
        seed = UInt64.random(in: 1...UInt64.max)
    }

    /// A detector with a configuration's threshold and window (clamped as ``init(threshold:window:capacity:)`` does).
    public convenience init(_ configuration: DMPConfiguration, capacity: Int = 4096) {
        self.init(threshold: configuration.threshold, window: configuration.window, capacity: capacity)
    }

    deinit {
        slots.deallocate()
        ring.deallocate()
    }

    @inline(__always)
    private static func tag(_ site: ExitSite) -> UInt64 { ExitSiteHash.tag(site) }

    @inline(__always)
    private func start(_ rip: UInt64, _ address: UInt64, _ tag: UInt64) -> Int {
        ExitSiteHash.start(rip: rip, address: address, tag: tag, seed: seed, mask: mask)
    }

    /// The slot of `site`, inserting it when `insert` is set and there is room; -1 when none.
    @inline(__always)
    private func slotIndex(_ site: ExitSite, insert: Bool) -> Int {
        let tag = HotspotDetector.tag(site)
        var i = start(site.rip, site.address, tag)
        for _ in 0..<HotspotDetector.probeLimit {
            let s = slots + i
            if s.pointee.tag == tag && s.pointee.rip == site.rip && s.pointee.address == site.address { return i }
            if s.pointee.tag == 0 {
                guard insert, siteCount < capacity else { return -1 }
                s.pointee = Slot(rip: site.rip, address: site.address, tag: tag, total: 0, inWindow: 0, reported: 0)
                siteCount += 1
                return i
            }
            i = (i + 1) & mask
        }
        return -1
    }

    /// Records one exit at `site`; returns `true` when this exit makes the site
    /// a candidate (its count among the last ``window`` exits reached
    /// ``threshold`` and it was not reported since it was last armed).
    ///
    /// Allocation-free, a bounded number of probes: call it on the exit path.
    @inline(__always)
    @discardableResult
    public func record(_ site: ExitSite) -> Bool {
        recorded &+= 1
        let i = slotIndex(site, insert: true)
        // The exit leaving the window.
        let leaving = ring[ringPosition]
        if leaving != HotspotDetector.noSlot { slots[Int(leaving)].inWindow &-= 1 }
        guard i >= 0 else {
            untracked &+= 1
            ring[ringPosition] = HotspotDetector.noSlot
            advance()
            return false
        }
        ring[ringPosition] = UInt32(truncatingIfNeeded: i)
        advance()
        let s = slots + i
        s.pointee.total &+= 1
        s.pointee.inWindow &+= 1
        guard s.pointee.reported == 0, Int(s.pointee.inWindow) >= threshold else { return false }
        s.pointee.reported = 1
        candidatesReported &+= 1
        return true
    }

    @inline(__always)
    private func advance() {
        ringPosition += 1
        if ringPosition == window { ringPosition = 0 }
    }

    /// Arms `site` again after it was reported: the next ``record(_:)`` that
    /// finds its count in the window at ``threshold`` reports it again (a
    /// retry after back-off). Returns `false` when the detector does not hold the site.
    @discardableResult
    public func rearm(_ site: ExitSite) -> Bool {
        let i = slotIndex(site, insert: false)
        guard i >= 0 else { return false }
        slots[i].reported = 0
        return true
    }

    /// What the detector knows about `site`, or `nil` when it does not hold it.
    public func counts(of site: ExitSite) -> Entry? {
        let i = slotIndex(site, insert: false)
        guard i >= 0 else { return nil }
        let s = slots[i]
        return Entry(site: site, total: Int(truncatingIfNeeded: s.total), inWindow: Int(s.inWindow), reported: s.reported != 0)
    }

    /// Every site held (allocates: not for the exit path).
    public var entries: [Entry] {
        var out: [Entry] = []
        out.reserveCapacity(siteCount)
        for i in 0...mask where slots[i].tag != 0 {
            let s = slots[i]
            let kind = ExitKind(rawValue: Int((s.tag >> 16) & 0xff)) ?? .unsupported
            let site = ExitSite(rip: s.rip, kind: kind, address: s.address, size: UInt8(truncatingIfNeeded: s.tag >> 8),
                                direction: AccessDirection(rawValue: UInt8(truncatingIfNeeded: s.tag)) ?? .read)
            out.append(Entry(site: site, total: Int(truncatingIfNeeded: s.total), inWindow: Int(s.inWindow), reported: s.reported != 0))
        }
        return out
    }

    /// The `n` sites with the most exits of all time, most first (ties by RIP): the profiler's view.
    public func topSites(_ n: Int) -> [Entry] {
        Array(entries.sorted { $0.total != $1.total ? $0.total > $1.total : $0.site.rip < $1.site.rip }.prefix(max(0, n)))
    }

    /// Forgets every site, the window and the totals.
    public func reset() {
        slots.update(repeating: Slot(rip: 0, address: 0, tag: 0, total: 0, inWindow: 0, reported: 0), count: mask + 1)
        ring.update(repeating: HotspotDetector.noSlot, count: window)
        ringPosition = 0
        siteCount = 0
        recorded = 0
        untracked = 0
        candidatesReported = 0
    }
}

import DMP
import Testing
import VMMKit

private func site(_ rip: UInt64, port: UInt64 = 0x3f8, size: UInt8 = 1, direction: AccessDirection = .write) -> ExitSite {
    ExitSite(rip: rip, kind: .io, address: port, size: size, direction: direction)
}

@Suite("HotspotDetector: sliding window, candidates once, re-arming, profiler view")
struct HotspotDetectorTests {
    @Test("a site is reported once, on the exit that brings it to the threshold")
    func reportsOnce() {
        let d = HotspotDetector(threshold: 4, window: 100)
        let s = site(0x1000)
        let reports = (0..<20).map { _ in d.record(s) }
        #expect(reports == [false, false, false, true] + Array(repeating: false, count: 16))
        #expect(d.counts(of: s) == HotspotDetector.Entry(site: s, total: 20, inWindow: 20, reported: true))
        #expect(d.candidatesReported == 1)
    }

    @Test("the window is exact: exits that left it no longer count, so a slow site never becomes hot")
    func slidingWindow() {
        let d = HotspotDetector(threshold: 3, window: 10)
        let slow = site(0x2000), noise = site(0x3000, port: 0x80)
        var reported = false
        // One exit of `slow` every 5 exits: at most 2 of them in any 10 consecutive exits.
        for i in 0..<200 {
            let s = i % 5 == 0 ? slow : noise
            if d.record(s) && s == slow { reported = true }
        }
        #expect(!reported)
        let e = d.counts(of: slow)
        #expect(e?.total == 40)
        #expect(e?.inWindow == 2)
        #expect(d.counts(of: noise)?.inWindow == 8)
        #expect(d.counts(of: noise)?.reported == true, "noise is 8 of every 10 exits")
        // Three in a row make it hot.
        #expect(d.record(slow) == false)
        #expect(d.record(slow) == true)
    }

    @Test("sites differ by RIP and by access: kind, port or address, width, direction")
    func siteIdentity() {
        let d = HotspotDetector(threshold: 2, window: 64)
        let sites = [
            site(0x1000), site(0x1001), site(0x1000, port: 0x3f9), site(0x1000, size: 2), site(0x1000, direction: .read),
            ExitSite(rip: 0x1000, kind: .mmio, address: 0x3f8, size: 1, direction: .write),
        ]
        for s in sites { #expect(d.record(s) == false) }
        #expect(d.siteCount == sites.count)
        for s in sites { #expect(d.record(s) == true) }
    }

    @Test("re-arming reports the site again once it is at the threshold in the window; unknown sites are not re-armed")
    func rearm() {
        let d = HotspotDetector(threshold: 3, window: 8)
        let s = site(0x4000), other = site(0x5000)
        for _ in 0..<3 { d.record(s) }
        #expect(d.counts(of: s)?.reported == true)
        #expect(d.rearm(s))
        #expect(d.counts(of: s)?.reported == false)
        // Still at the threshold in the window: the next exit reports it again.
        #expect(d.record(s) == true)
        #expect(d.rearm(s))
        // Let it cool down: 8 other exits push it out of the window.
        for _ in 0..<8 { d.record(other) }
        #expect(d.counts(of: s)?.inWindow == 0)
        #expect(d.record(s) == false)
        #expect(d.record(s) == false)
        #expect(d.record(s) == true)
        #expect(d.rearm(site(0x9999)) == false)
        #expect(d.candidatesReported == 4, "s three times, other once")
    }

    @Test("a full table counts the rest as untracked and never reports them; the profiler sorts by total")
    func capacityAndTopSites() {
        let d = HotspotDetector(threshold: 1, window: 1000, capacity: 16)
        var reports = 0
        for i in 0..<40 { if d.record(site(0x1_0000 + UInt64(i))) { reports += 1 } }
        #expect(d.siteCount == 16)
        #expect(d.untracked == 24)
        #expect(reports == 16)
        #expect(d.recorded == 40)
        for _ in 0..<5 { d.record(site(0x1_0003)) }
        for _ in 0..<3 { d.record(site(0x1_0007)) }
        let top = d.topSites(3)
        #expect(top.map(\.site.rip) == [0x1_0003, 0x1_0007, 0x1_0000])
        #expect(top.map(\.total) == [6, 4, 1])
        #expect(d.topSites(100).count == 16)
        d.reset()
        #expect(d.siteCount == 0 && d.recorded == 0 && d.untracked == 0 && d.entries.isEmpty)
        #expect(d.record(site(0x1_0003)) == true, "after reset the site is new and armed")
    }

    @Test("threshold and window are clamped to sensible values; the configuration's are used")
    func configuration() {
        let d = HotspotDetector(threshold: 0, window: -5)
        #expect(d.threshold == 1 && d.window == 1)
        #expect(d.record(site(1)) == true)
        var c = DMPConfiguration()
        c.threshold = 7
        c.window = 3
        let e = HotspotDetector(c)
        #expect(e.threshold == 7 && e.window == 7)
    }

    @Test("threshold, window and capacity are clamped to their maxima: no huge window ring or table for huge values")
    func upperClamps() {
        let max = HotspotDetector.maximumWindow
        let d = HotspotDetector(threshold: Int.max, window: Int.max, capacity: Int.max)
        #expect(d.threshold == max && d.window == max && d.capacity == HotspotDetector.maximumCapacity)
        let e = HotspotDetector(threshold: 2, window: max + 1, capacity: HotspotDetector.maximumCapacity + 1)
        #expect(e.threshold == 2 && e.window == max && e.capacity == HotspotDetector.maximumCapacity)
        // Just inside: kept as given.
        let f = HotspotDetector(threshold: max, window: max, capacity: 16)
        #expect(f.threshold == max && f.window == max && f.capacity == 16)
        #expect(f.record(site(1)) == false)
        let g = HotspotDetector(threshold: Int.min, window: Int.min, capacity: Int.min)
        #expect(g.threshold == 1 && g.window == 1 && g.capacity == 16)
        #expect(g.record(site(1)) == true)
    }

    @Test("many distinct sites: totals and window counts stay consistent (window counts sum to the window)")
    func consistency() {
        let d = HotspotDetector(threshold: 50, window: 256, capacity: 1024)
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<10_000 {
            let hot = Bool.random(using: &rng)
            d.record(site(hot ? 0x7000 : 0x8000 + UInt64.random(in: 0..<300, using: &rng)))
        }
        let entries = d.entries
        #expect(entries.reduce(0) { $0 + $1.inWindow } == 256)
        #expect(entries.reduce(0) { $0 + $1.total } == 10_000)
        #expect(d.counts(of: site(0x7000))?.reported == true)
    }
}

import DMP
import Testing
import VMMKit

// DMP's arithmetic on configuration values saturates instead of trapping: a window's age limit in seconds
// (Int64(seconds * 1e9) trapped for a huge, NaN or infinite value) and back-offs (base << undos overflowed, and
// adding it to an exit count trapped). DMPMiddleware validates its configuration, so these are the last line.

@Suite("saturating arithmetic on configuration values")
struct SaturationTests {
    @Test("a window's age limit: seconds to a Duration, zero for NaN or <= 0, Int64.max ns for anything too long")
    func windowAge() {
        #expect(VerifyWindow.duration(seconds: 1) == .seconds(1))
        #expect(VerifyWindow.duration(seconds: 0.05) == .milliseconds(50))
        #expect(VerifyWindow.duration(seconds: 86_400) == .seconds(86_400))
        #expect(VerifyWindow.duration(seconds: 0) == .zero)
        #expect(VerifyWindow.duration(seconds: -1) == .zero)
        #expect(VerifyWindow.duration(seconds: -.infinity) == .zero)
        #expect(VerifyWindow.duration(seconds: .nan) == .zero)
        #expect(VerifyWindow.duration(seconds: 9.2e9.nextDown) == .nanoseconds(Int64(9.2e9.nextDown * 1e9)))
        #expect(VerifyWindow.duration(seconds: 9.2e9) == .nanoseconds(Int64.max))
        #expect(VerifyWindow.duration(seconds: 1e300) == .nanoseconds(Int64.max))
        #expect(VerifyWindow.duration(seconds: .infinity) == .nanoseconds(Int64.max))
    }

    @Test("a window observed with an infinite or NaN age limit neither traps nor closes early")
    func windowObserve() {
        let t0 = ContinuousClock.now
        for seconds in [Double.infinity, 1e300, .nan, -5] {
            var c = DMPConfiguration()
            c.verifyWindowSeconds = seconds
            c.verifyWindowAccesses = 100
            var w = VerifyWindow(at: SiteCosts(), now: t0)
            // 10 accesses, a second later: only an age limit of at most a second (NaN and negative count as 0) closes
            // it, idle (fewer than 100/8 accesses).
            let verdict = w.observe(SiteCosts(hits: 10), now: t0 + .seconds(1), configuration: c)
            #expect(verdict == (seconds.isNaN || seconds <= 0 ? .idle : .open), "\(seconds)")
        }
    }

    @Test("back-offs double per undo (at most 20 times) and saturate at Int.max")
    func backOff() {
        #expect(SiteRecord.backOff(base: 1 << 14, undos: 1) == 1 << 14)
        #expect(SiteRecord.backOff(base: 1 << 14, undos: 3) == 1 << 16)
        #expect(SiteRecord.backOff(base: 4, undos: 100) == 4 << 20)
        #expect(SiteRecord.backOff(base: 0, undos: 1) == 1)
        #expect(SiteRecord.backOff(base: -7, undos: 2) == 2)
        #expect(SiteRecord.backOff(base: DMPConfiguration.maximumBackoff, undos: 21) == 1 << 60)
        #expect(SiteRecord.backOff(base: (1 << 43) - 1, undos: 21) == ((1 << 43) - 1) << 20)
        #expect(SiteRecord.backOff(base: 1 << 43, undos: 21) == .max)
        #expect(SiteRecord.backOff(base: .max, undos: 2) == .max)
        #expect(SiteRecord.backOff(base: .max, undos: 1) == .max)
    }

    @Test("sums saturate at Int.max and Int.min")
    func sums() {
        #expect(SiteRecord.saturatingSum(5, 7) == 12)
        #expect(SiteRecord.saturatingSum(.max - 1, 1) == .max)
        #expect(SiteRecord.saturatingSum(.max, 1) == .max)
        #expect(SiteRecord.saturatingSum(5, .max) == .max)
        #expect(SiteRecord.saturatingSum(.min, -1) == .min)
        #expect(SiteRecord.saturatingSum(.min + 1, -1) == .min)
    }

    @Test("a saturated back-off is never over: the retry point does not wrap to a negative count")
    func saturatedRetry() {
        var r = SiteRecord(report: PatchSite(site: ExitSite(rip: 0x1000, kind: .io, address: 0x80, size: 1, direction: .write),
                                             location: "x"))
        r.retryAtExits = -SiteRecord.backOff(base: .max, undos: 3)
        #expect(r.backOffOver(atExits: 5) == false)
        #expect(r.retryAtExits == .max)
        #expect(r.backOffOver(atExits: .max) == true)
        var s = r
        s.retryAtExits = -16
        #expect(s.backOffOver(atExits: 100) == false)
        #expect(s.backOffOver(atExits: 116) == true)
    }
}

@testable import DMP
import Testing
import VMMKit

/// ``HitCount``: a guest-written hit counter is believed only while its changes are plausible.
struct HitCountTests {
    let memory: GuestMemory
    let counter = GuestAddress(0x1008)

    init() throws {
        memory = try GuestMemory(ranges: [(GuestRange(start: GuestAddress(0), size: 1 << 20), false)])
    }

    @Test("increments the stub could have made are counted, across observations")
    func plausibleIncrements() throws {
        var h = HitCount(counter: counter, ring: nil, now: .now - .seconds(1))
        try memory.write(UInt64(1000), at: counter)
        #expect(h.observe(memory) { _ in nil } == 1000)
        try memory.write(UInt64(1500), at: counter)
        #expect(h.observe(memory) { _ in nil } == 1500)
        #expect(h.trusted)
    }

    @Test("a counter that went down is untrusted and keeps its last plausible total")
    func decrease() throws {
        var h = HitCount(counter: counter, ring: nil, now: .now - .seconds(1))
        try memory.write(UInt64(1000), at: counter)
        h.observe(memory) { _ in nil }
        try memory.write(UInt64(10), at: counter)
        #expect(h.observe(memory) { _ in nil } == 1000)
        #expect(!h.trusted)
        #expect(h.distrust?.contains("went down") == true)
        // Once untrusted, later values (even plausible ones) are not believed.
        try memory.write(UInt64(1200), at: counter)
        #expect(h.observe(memory) { _ in nil } == 1000)
    }

    @Test("a jump of more than one hit per nanosecond is untrusted")
    func jump() throws {
        var h = HitCount(counter: counter, ring: nil)
        try memory.write(UInt64(0x9e37_79b9_0000_0001), at: counter)
        #expect(h.observe(memory) { _ in nil } == 0)
        #expect(h.distrust?.contains("one per ns") == true)
    }

    @Test("a ring-append counter is bounded by the entries the ring consumed since the patch plus its slot count")
    func ringBound() throws {
        var h = HitCount(counter: counter, ring: (index: 0, slotCount: 4, consumed: 100), now: .now - .seconds(1))
        try memory.write(UInt64(50), at: counter)
        #expect(h.observe(memory) { _ in 148 } == 50)   // 48 consumed + 4 in flight: 50 is possible
        try memory.write(UInt64(60), at: counter)
        #expect(h.observe(memory) { _ in 150 } == 50)   // 60 > 50 + 4: not possible
        #expect(h.distrust?.contains("ring 0 consumed only 50") == true)
    }

    @Test("an unreadable counter leaves the count as it was")
    func unreadable() {
        var h = HitCount(counter: GuestAddress(1 << 40), ring: nil)
        #expect(h.observe(memory) { _ in nil } == 0)
        #expect(h.trusted)
    }
}

/// A synchronous append's wait counter, read with its hit counter.
struct WaitCountTests {
    let memory: GuestMemory
    let counter = GuestAddress(0x1008)
    var waits: GuestAddress { GuestAddress(counter.rawValue + 8) }

    init() throws {
        memory = try GuestMemory(ranges: [(GuestRange(start: GuestAddress(0), size: 1 << 20), false)])
    }

    @Test("wait iterations up to the limit per counted append are accepted")
    func plausible() throws {
        var h = HitCount(counter: counter, ring: nil, waits: (waits, 1000), now: .now - .seconds(1))
        try memory.write(UInt64(10), at: counter)
        try memory.write(UInt64(9000), at: waits)
        #expect(h.observe(memory) { _ in nil } == 10)
        #expect(h.waited == 9000 && h.trusted)
        try memory.write(UInt64(11), at: counter)      // the next reading comes at least tens of ns later
        try memory.write(UInt64(9_010), at: waits)
        h.observe(memory) { _ in nil }
        #expect(h.waited == 9_010 && h.trusted)
    }

    @Test("more iterations than the limit allows for the appends counted (plus a few in flight) make the site untrusted")
    func beyondLimit() throws {
        var h = HitCount(counter: counter, ring: nil, waits: (waits, 1000), now: .now - .seconds(1))
        try memory.write(UInt64(2), at: counter)
        try memory.write(UInt64(1000 * (2 + HitCount.appendsInFlight) + 1), at: waits)
        #expect(h.observe(memory) { _ in nil } == 0)
        #expect(h.waited == 0 && !h.trusted)
        #expect(h.distrust?.contains("wait counter") == true)
    }

    @Test("a wait counter that went down makes the site untrusted; the totals stay at their last plausible values")
    func decrease() throws {
        var h = HitCount(counter: counter, ring: nil, waits: (waits, 1000), now: .now - .seconds(1))
        try memory.write(UInt64(5), at: counter)
        try memory.write(UInt64(500), at: waits)
        h.observe(memory) { _ in nil }
        try memory.write(UInt64(6), at: counter)
        try memory.write(UInt64(100), at: waits)
        #expect(h.observe(memory) { _ in nil } == 5)
        #expect(h.waited == 500)
        #expect(h.distrust?.contains("went down") == true)
    }
}

/// ``VerifyWindow``: a patched site's costs judged in windows over the patch's life.
struct VerifyWindowTests {
    var configuration: DMPConfiguration {
        var c = DMPConfiguration()
        c.verifyWindowAccesses = 100
        c.verifyWindowSeconds = 1
        c.verifyCostLimit = 0.9
        c.verifyLosingWindows = 3
        c.waitIterationsPerExit = 1000
        return c
    }

    @Test("cost per access: exits and wait iterations (as exits) over hits and fallbacks; kicks are exits, not accesses")
    func cost() {
        let d = SiteCosts(hits: 90, exits: 30, kicks: 20, waitIterations: 50_000)
        #expect(d.accesses == 100)
        #expect(VerifyWindow.costPerAccess(d, waitIterationsPerExit: 1000) == 0.8)
        #expect(VerifyWindow.costPerAccess(SiteCosts(), waitIterationsPerExit: 1000) == 0)
    }

    @Test("three losing windows in a row undo; one paying window in between ends the streak; a window in the band between leaves it")
    func hysteresis() {
        let c = configuration
        let t0 = ContinuousClock.now
        var w = VerifyWindow(at: SiteCosts(), now: t0)
        var costs = SiteCosts()
        func step(hits: UInt64, exits: Int = 0, kicks: Int = 0, waits: UInt64 = 0) -> VerifyWindow.Verdict {
            costs.hits += hits; costs.exits += exits; costs.kicks += kicks; costs.waitIterations += waits
            return w.observe(costs, now: t0 + .milliseconds(20), configuration: c)
        }
        #expect(step(hits: 50) == .open)
        #expect(step(hits: 50, exits: 50, kicks: 50, waits: 100_000) == .loses(1.5))   // 100 accesses, 50 + 100 exits
        #expect(step(hits: 100, exits: 100, kicks: 100) == .loses(1.0))
        #expect(!w.shouldUndo(c))
        #expect(step(hits: 100, exits: 10, kicks: 10, waits: 20_000) == .pays(0.3))
        #expect(w.losingStreak == 0)
        #expect(step(hits: 100, waits: 200_000) == .loses(2.0))
        #expect(step(hits: 100, exits: 60, kicks: 60) == .unclear(0.6))
        #expect(step(hits: 100, waits: 100_000) == .loses(1.0))
        #expect(!w.shouldUndo(c) && w.losingStreak == 2)
        guard case .loses(let cost) = step(hits: 100, exits: 100, kicks: 100, waits: 65_536 * 100) else {
            Issue.record("a window of full waits did not lose")
            return
        }
        #expect(abs(cost - 66.536) < 1e-9)
        #expect(w.shouldUndo(c))
        #expect(w.judged == 7)
        #expect(w.reason(c).contains("66.54 exits per access in 3 windows in a row"))
        #expect(w.reason(c).contains("6553600 wait iterations"))
    }

    @Test("a window whose costs already exceed a full window's limit loses at once (with at least an eighth of its accesses)")
    func earlyLoss() {
        let c = configuration                       // a full window: 100 accesses, at most 90 exits
        let t0 = ContinuousClock.now
        var w = VerifyWindow(at: SiteCosts(), now: t0)
        #expect(w.observe(SiteCosts(hits: 11, exits: 5, kicks: 5, waitIterations: 700_000), now: t0, configuration: c) == .open)
        #expect(w.observe(SiteCosts(hits: 12, exits: 6, kicks: 6, waitIterations: 800_000), now: t0, configuration: c) == .loses(806.0 / 12))
        #expect(w.losingStreak == 1)
        // A cheap window of the same few accesses stays open.
        #expect(w.observe(SiteCosts(hits: 24, exits: 6, kicks: 6, waitIterations: 801_000), now: t0, configuration: c) == .open)
    }

    @Test("a site the guest stopped using is not judged: an old window with too few accesses is idle and keeps the streak")
    func idle() {
        let c = configuration
        let t0 = ContinuousClock.now
        var w = VerifyWindow(at: SiteCosts(hits: 7, exits: 3), now: t0)
        #expect(w.observe(SiteCosts(hits: 7 + 100, exits: 3 + 100, kicks: 100), now: t0, configuration: c) == .loses(1))
        #expect(w.observe(SiteCosts(hits: 107, exits: 103, kicks: 100), now: t0 + .milliseconds(500), configuration: c) == .open)
        // No accesses for a second and more, many times over: idle, never a loss.
        for k in 1...10 {
            #expect(w.observe(SiteCosts(hits: 107 + UInt64(k), exits: 103, kicks: 100), now: t0 + .seconds(2 * k), configuration: c) == .idle)
        }
        #expect(w.losingStreak == 1 && w.judged == 1 && !w.shouldUndo(c))
        // A slow site (a dozen accesses in a second, at least an eighth of a window) is still judged.
        #expect(w.observe(SiteCosts(hits: 117 + 12, exits: 103, kicks: 100), now: t0 + .seconds(22), configuration: c) == .pays(0))
    }
}

import Testing
@testable import DMP

/// ``RateTrial``: the A/B trial that judges a patch of CPL0 code by its sites' rate of accesses, patched and not.
@Suite("A/B trials of CPL0 patches")
struct RateTrialTests {
    static var configuration: DMPConfiguration {
        var c = DMPConfiguration()
        c.trialPhaseSeconds = 0.05
        c.trialPairs = 3
        c.trialMinimumAccesses = 32
        c.trialMinimumRatio = 0.95
        return c
    }

    /// Runs a trial whose phases see `offRate` and `onRate` accesses per second, observed every 20 ms; each
    /// switch is made, except that the switches numbered in `busy` (from 0, each attempt counted) find a vCPU
    /// inside the bytes to write.
    static func run(offRate: Double, onRate: Double, limit: Int = 200, busy: Set<Int> = []) -> (steps: [RateTrial.Step], trial: RateTrial) {
        var t = RateTrial()
        var steps: [RateTrial.Step] = []
        var accesses = 0.0
        var now = 0.0
        var attempts = 0
        for _ in 0..<limit {
            let step = t.observe(accesses: UInt64(accesses), now: now, configuration: configuration)
            if step != .wait { steps.append(step) }
            if case .done = step { break }
            if case .switchTo = step {
                if busy.contains(attempts) { t.busy() } else { t.switched() }
                attempts += 1
            }
            now += 0.02
            accesses += (t.phase == .off ? offRate : onRate) * 0.02
        }
        return (steps, t)
    }

    @Test("phases alternate off, on for each pair, then the verdict: slower patched loses, with the rates")
    func loses() {
        let (steps, t) = RateTrialTests.run(offRate: 20_000, onRate: 10_000)
        #expect(Array(steps.dropLast()) == [.switchTo(.off), .switchTo(.on), .switchTo(.off), .switchTo(.on),
                                            .switchTo(.off), .switchTo(.on)])
        guard case .done(.loses(let ratio, let on, let off)) = steps.last else {
            Issue.record("\(steps)")
            return
        }
        #expect(abs(ratio - 0.5) < 0.05 && abs(on - 10_000) < 1_000 && abs(off - 20_000) < 2_000)
        #expect(t.pairs.count == 3)
        let why = RateTrial.reason(.loses(ratio: ratio, on: on, off: off), pairs: 3, configuration: RateTrialTests.configuration)
        #expect(why.contains("slower with the patch") && why.contains("3 pairs of 50 ms"), "\(why)")
    }

    @Test("faster patched, or about the same (noise within the minimum ratio), pays")
    func pays() {
        for (off, on) in [(10_000.0, 30_000.0), (10_000.0, 9_800.0)] {
            let (steps, _) = RateTrialTests.run(offRate: off, onRate: on)
            guard case .done(.pays(let ratio, _, _)) = steps.last else {
                Issue.record("\(steps)")
                continue
            }
            #expect(abs(ratio - on / off) < 0.1)
        }
    }

    @Test("a phase short of accesses runs on up to four times its length; a site the guest stopped using ends idle")
    func idle() {
        // 100 accesses/s: 5 per 50 ms phase, 20 in four phases' time, under the 32 needed.
        let (steps, t) = RateTrialTests.run(offRate: 100, onRate: 100)
        #expect(steps.last == .done(.idle))
        #expect(t.pairs.allSatisfy { $0 == nil })
        // 400 accesses/s: 20 in one phase's time, 32 after 80 ms: the phases run longer but count.
        let (slow, _) = RateTrialTests.run(offRate: 400, onRate: 800)
        guard case .done(.pays(let ratio, _, _)) = slow.last else {
            Issue.record("\(slow)")
            return
        }
        #expect(abs(ratio - 2) < 0.3)
    }

    @Test("a lost trial backs off for the exits of twenty trials' time (5%), at least the usual back-off")
    func backOff() {
        let c = RateTrialTests.configuration
        // 36,000 accesses/s over two sites, a 0.3 s trial: 18,000 × 0.3 / 0.05 = 108,000 exits of one site.
        #expect(RateTrial.backOff(offRate: 36_000, sites: 2, configuration: c) == 108_000)
        #expect(RateTrial.backOff(offRate: 100, sites: 1, configuration: c) == c.initialBackoff)
        #expect(RateTrial.backOff(offRate: .infinity, sites: 0, configuration: c) == c.initialBackoff)
    }

    @Test("no observation starts a trial before notBefore; a trial with nothing measured is idle")
    func notBefore() {
        var t = RateTrial(notBefore: 1)
        #expect(t.observe(accesses: 0, now: 0.5, configuration: RateTrialTests.configuration) == .wait)
        #expect(!t.started)
        #expect(t.observe(accesses: 0, now: 1, configuration: RateTrialTests.configuration) == .switchTo(.off))
        #expect(RateTrial().verdict(RateTrialTests.configuration) == .idle)
        #expect(RateTrial.median([1, 2, 3, 10]) == 2.5 && RateTrial.median([3]) == 3 && RateTrial.median([]) == 0)
    }

    @Test("a switch that finds a vCPU inside the bytes to write keeps the phase in force and is asked for again at the next observation; the time it ran on is measured as neither phase")
    func busySwitch() {
        // Every off switch busy for five observations (100 ms with the patch still on, at the on rate): were that
        // time measured as an off phase, the off rate would come out near the on rate and the trial would pay.
        let busy = Set([0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 14, 15, 16, 17, 18])
        let (steps, t) = RateTrialTests.run(offRate: 20_000, onRate: 10_000, busy: busy)
        #expect(Array(steps.dropLast()) == Array(repeating: RateTrial.Step.switchTo(.off), count: 6) + [.switchTo(.on)]
                + Array(repeating: .switchTo(.off), count: 6) + [.switchTo(.on)] + Array(repeating: .switchTo(.off), count: 6)
                + [.switchTo(.on)])
        guard case .done(.loses(let ratio, let on, let off)) = steps.last else {
            Issue.record("\(steps)")
            return
        }
        #expect(abs(ratio - 0.5) < 0.05 && abs(on - 10_000) < 1_000 && abs(off - 20_000) < 2_000, "\(ratio) \(on) \(off)")
        #expect(t.pairs.count == 3 && t.busyPasses == 0)
    }

    @Test("busy() counts the observations in a row whose switch found a vCPU inside; switched() puts the phase asked for in force and ends the count")
    func busyCount() {
        let c = RateTrialTests.configuration
        var t = RateTrial()
        #expect(t.observe(accesses: 0, now: 0, configuration: c) == .switchTo(.off))
        #expect(t.phase == .on && t.pending == .off, "not in force before it is written")
        #expect(t.busy() == 1)
        #expect(t.observe(accesses: 10, now: 0.02, configuration: c) == .switchTo(.off), "asked for again at once")
        #expect(t.busy() == 2 && t.phase == .on)
        #expect(t.observe(accesses: 20, now: 0.04, configuration: c) == .switchTo(.off))
        t.switched()
        #expect(t.phase == .off && t.pending == nil && t.busyPasses == 0)
        // The off phase is timed from the observation that asked for the switch made (0.04 s, 20 accesses).
        #expect(t.observe(accesses: 40, now: 0.08, configuration: c) == .wait, "0.04 s of a 0.05 s phase")
        #expect(t.observe(accesses: 70, now: 0.10, configuration: c) == .switchTo(.on))
        t.switched()
        #expect(t.phase == .on)
    }
}

/// An A/B trial of a patch whose cost no count shows (DESIGN.md, DMP step 7): code at CPL0, whose bodies
/// run natively on hardware virtualization but may run emulated (on KVM PVM every CPL0 instruction is emulated,
/// so a ten-instruction body can cost more than the exit it saves).
///
/// The patch is switched off and on in alternating phases (``DMPConfiguration/trialPhaseSeconds`` each,
/// ``DMPConfiguration/trialPairs`` pairs, starting with *off*): off, the guest's original bytes are back (the
/// implanted code and the page guards stay), so the original instructions exit as they did before the patch; on,
/// the patch is written again. The off arm is the guest as the patch's undo would leave it: a patch that appends to
/// a paravirtual ring counts as no producer while off (with no other ring patch live, the guest's own writes to the
/// target register no longer keep the ring poller polling, and it sleeps), so the on arm alone pays for the poller
/// (on a loaded host, its CPU taken from the vCPU; a trial whose arms both paid for it kept patches that left the
/// guest slower than without DMP). Each phase's rate is the patch's sites' accesses (served in the guest, fallen back,
/// or exits at the original instructions) per second; the guest doing the same work makes more accesses per second
/// when they are cheaper. The trial loses when the median of the pairs' ratios (rate on over rate off) is below
/// ``DMPConfiguration/trialMinimumRatio``. (Switching only the devices' enable words would not do: a body that
/// finds its word clear still runs its prologue, which costs what the whole body costs where it runs emulated.)
///
/// Both kinds of phase see the same host and the same guest phase, a few tens of milliseconds apart, which a rate
/// measured once before the patch and once after does not: other patches applied or undone meanwhile, the guest
/// moving from boot to its loop, a loaded host. A phase with fewer than ``DMPConfiguration/trialMinimumAccesses``
/// accesses is extended up to four times its length; a pair still short of them is idle and judges nothing (the
/// guest stopped using the site); a trial with no judged pair ends idle and is tried again later.
///
/// A switch is asked for (``Step/switchTo(_:)``) and confirmed by the caller once written (``switched()``); until
/// then the phase asked for is ``pending`` and ``phase`` stays the one in force. A switch that found a vCPU inside
/// the bytes to write (``busy()``) is asked for again at the next observation, and the new phase starts there: the
/// time the old phase ran on after it was measured is counted in neither (a phase that could not be switched is
/// never measured as the other one).
package struct RateTrial: Sendable {
    /// Which way the patch is switched.
    package enum Phase: Equatable, Sendable {
        /// The guest's original bytes: the original instructions exit.
        case off
        /// The patch's bytes: the implanted code serves the accesses.
        case on
    }

    /// What the trial asks for after an observation.
    package enum Step: Equatable, Sendable {
        /// Nothing to do yet.
        case wait
        /// Switch the patch to `phase` now (a new phase starts at this observation).
        case switchTo(Phase)
        /// The trial is over (it ends in an *on* phase: the patch is in place).
        case done(Verdict)
    }

    /// How a finished trial came out.
    package enum Verdict: Equatable, Sendable {
        /// The median ratio (rate on / rate off) is at least the minimum: the patch stays.
        case pays(ratio: Double, on: Double, off: Double)
        /// The median ratio is below the minimum: the patch is slower than the exits it replaced.
        case loses(ratio: Double, on: Double, off: Double)
        /// No pair had enough accesses to judge.
        case idle
    }

    /// The phase in force (the guest's bytes are this phase's).
    package private(set) var phase: Phase = .on
    /// A switch asked for and not confirmed yet (``switched()``); asked for again at each observation until it is.
    package private(set) var pending: Phase?
    /// Observations in a row at which the switch asked for found a vCPU inside the bytes to write (``busy()``).
    package private(set) var busyPasses = 0
    /// Whether the guest's original bytes are in place (an *off* phase in force): the patch serves nothing, and
    /// nothing else it brings may run on meanwhile (its ring producers count as detached, so the poller sleeps
    /// as after an undo): the off arm is the guest as the patch's undo would leave it.
    package var originalBytesInPlace: Bool { phase == .off }
    /// Whether the trial has started (its first *off* phase was asked for).
    package private(set) var started = false
    private var phaseStart = 0.0
    private var accessesAtPhaseStart: UInt64 = 0
    private var offRate: Double?
    /// The pairs measured so far: rates with the patch off and on, accesses per second (nil: idle pair).
    package private(set) var pairs: [(off: Double, on: Double)?] = []

    /// No observation before this time (seconds, on the clock ``observe(accesses:now:configuration:)`` is given).
    package let notBefore: Double

    /// A trial that starts at its first observation at or after `notBefore`.
    package init(notBefore: Double = 0) { self.notBefore = notBefore }

    /// Observes the patch's accesses (its sites' hits, fallbacks and exits at the original instructions, monotonic) at `now` (seconds, monotonic);
    /// returns what to do.
    package mutating func observe(accesses: UInt64, now: Double, configuration c: DMPConfiguration) -> Step {
        guard started else {
            guard now >= notBefore else { return .wait }
            started = true
            return begin(.off, accesses: accesses, now: now)
        }
        // The last switch was not made: ask again; the phase starts now (the old one was measured already).
        if let p = pending { return begin(p, accesses: accesses, now: now) }
        let length = max(0.001, c.trialPhaseSeconds)
        let elapsed = now - phaseStart
        let n = accesses &- min(accesses, accessesAtPhaseStart)
        let minimum = UInt64(max(1, c.trialMinimumAccesses))
        guard elapsed >= length else { return .wait }
        // A phase short of accesses runs on, up to four times its length.
        if n < minimum && elapsed < 4 * length { return .wait }
        let rate: Double? = n >= minimum && elapsed > 0 ? Double(n) / elapsed : nil
        switch phase {
        case .off:
            offRate = rate
            return begin(.on, accesses: accesses, now: now)
        case .on:
            if let off = offRate, let on = rate { pairs.append((off, on)) } else { pairs.append(nil) }
            offRate = nil
            guard pairs.count >= max(1, c.trialPairs) else { return begin(.off, accesses: accesses, now: now) }
            return .done(verdict(c))
        }
    }

    /// The switch asked for was written: its phase is in force, timed from the observation that asked for it.
    package mutating func switched() {
        guard let p = pending else { return }
        phase = p
        pending = nil
        busyPasses = 0
    }

    /// The switch asked for found a vCPU inside the bytes to write and changed nothing: the phase in force stays,
    /// and the next observation asks for the switch again. Returns the observations in a row that found one.
    @discardableResult
    package mutating func busy() -> Int {
        busyPasses += 1
        return busyPasses
    }

    private mutating func begin(_ p: Phase, accesses: UInt64, now: Double) -> Step {
        pending = p
        phaseStart = now
        accessesAtPhaseStart = accesses
        return .switchTo(p)
    }

    /// The verdict over the pairs measured (idle pairs left out).
    package func verdict(_ c: DMPConfiguration) -> Verdict {
        let judged = pairs.compactMap { $0 }.filter { $0.off > 0 }
        guard !judged.isEmpty else { return .idle }
        let ratios = judged.map { $0.on / $0.off }.sorted()
        let ons = judged.map(\.on).sorted(), offs = judged.map(\.off).sorted()
        let ratio = RateTrial.median(ratios)
        let on = RateTrial.median(ons), off = RateTrial.median(offs)
        return ratio < c.trialMinimumRatio ? .loses(ratio: ratio, on: on, off: off) : .pays(ratio: ratio, on: on, off: off)
    }

    /// The median of sorted values (the mean of the middle two for an even count).
    static func median(_ sorted: [Double]) -> Double {
        guard !sorted.isEmpty else { return 0 }
        let m = sorted.count / 2
        return sorted.count % 2 == 1 ? sorted[m] : (sorted[m - 1] + sorted[m]) / 2
    }

    /// The first back-off, in exits of one site, after a lost trial: at least the usual one, and long enough that
    /// trials take at most ``DMPConfiguration/trialTimeShare`` of the guest's time — the exits one site makes, at
    /// the rate measured with the original code (`offRate`, the patch's `sites` together), over the trial's
    /// length divided by that share (each later undo doubles it, as every back-off). A trial measures directly,
    /// under the conditions of the moment; trying again soon would measure the same.
    package static func backOff(offRate: Double, sites: Int, configuration c: DMPConfiguration) -> Int {
        let trialSeconds = 2 * Double(max(1, c.trialPairs)) * max(0, c.trialPhaseSeconds)
        let share = min(max(c.trialTimeShare, 0.001), 1)
        let exits = offRate / Double(max(1, sites)) * trialSeconds / share
        return max(c.initialBackoff, exits.isFinite ? Int(min(exits, Double(1 << 40))) : c.initialBackoff)
    }

    /// The undo reason for a trial that lost.
    package static func reason(_ v: Verdict, pairs: Int, configuration c: DMPConfiguration) -> String {
        guard case .loses(let ratio, let on, let off) = v else { return "the A/B trial did not lose" }
        return "slower with the patch: \(fixed(on, 0)) accesses/s patched against \(fixed(off, 0)) with the original code "
            + "(median ratio \(fixed(ratio, 2)) over \(pairs) pairs of \(fixed(c.trialPhaseSeconds * 1000, 0)) ms "
            + "phases, below \(fixed(c.trialMinimumRatio, 2)); CPL0 code, whose bodies may run emulated)"
    }
}

import Synchronization
import VMMKit

// DMP step 7 (verify, adapt, undo): the periodic judgement of every live patch, and the reading of its hit and
// wait counters, which the guest can write (``HitCount``). Runs on the VM's timer thread, never on the exit path.
extension DMPMiddleware {
    /// Judges every patch by its sites' costs (``VerifyWindow``) over its whole life; undoes patches that stopped paying.
    ///
    /// - Each trusted site's window of accesses is judged against one exit per access: exits (fallbacks and kicks) and
    ///   wait iterations per access; ``DMPConfiguration/verifyLosingWindows`` losing windows in a row lose the site.
    ///   Idle windows judge nothing. A losing site of a function copy another site of which keeps paying is turned
    ///   off alone (``turnOff(_:ofPatch:reason:)``; the copy stays); otherwise the patch is undone whole
    ///   (``judgeLosingSites(_:of:_:)``). A site turned off alone is turned on again once its back-off is over.
    /// - A patch of CPL0 code (whose bodies may run emulated, a cost no count shows) first goes through an A/B trial
    ///   (``RateTrial``) once it has served an access: taken out and written again in alternating phases, its sites'
    ///   rate of accesses compared phase by phase; it is undone if it is slower in place. Its windows start after
    ///   the trial.
    /// - Once, at ``DMPConfiguration/verifyAfterAccesses`` accesses or a second of age: a patch that served nothing
    ///   is watched for never being entered.
    /// - A site whose hit or wait counter the guest wrote is judged by its exits alone, against the rate before.
    func verifyPatches() {
        guard let vm else { return }
        var verdicts: [(id: Int, why: DMPRefusal, backOffBase: Int?)] = []
        var rearm: [ExitSite] = []
        var switches: [(id: Int, phase: RateTrial.Phase, ending: RateTrial?)] = []
        var offs: [(id: Int, site: ExitSite, reason: String)] = []
        var ons: [(id: Int, site: ExitSite)] = []
        let now = ContinuousClock.now
        state.withLock { s in
            for (id, p) in s.patches {
                let age = Double(nanoseconds(since: p.appliedAt)) / 1e9
                guard age >= 0.05 else { continue }
                let userMode = p.sites.allSatisfy { s.sites[$0]?.report.userMode ?? true }
                // A CPL0 patch's windows start after its trial (the trial's off phases exit on purpose).
                let inTrial = !userMode && !s.judged.contains(id)
                var accesses = 0.0, exits = 0, atOriginal = 0
                var baseline = 0.0
                var trusted = true
                var losing: [(site: ExitSite, reason: String)] = []
                for site in p.sites {
                    guard var r = s.sites[site] else { continue }
                    let n = observeHits(&r, memory: vm.memory)
                    accesses += Double(n + UInt64(r.report.exitsWhilePatched - r.report.kicksWhilePatched))
                    exits += r.report.exitsWhilePatched
                    atOriginal += r.exitsAtOriginal
                    baseline += r.baselineRate ?? 0
                    trusted = trusted && r.report.hitCounterDistrust == nil
                    // A site turned off alone has no window (it is judged again once its fast path is back).
                    if r.report.hitCounterDistrust == nil, !inTrial, var w = r.window {
                        if case .loses = w.observe(r.costs, now: now, configuration: configuration), w.shouldUndo(configuration) {
                            losing.append((site, w.reason(configuration)))
                        }
                        r.window = w
                        r.report.windowsJudged = w.judged
                        r.report.lastWindowCost = w.last?.costPerAccess
                    }
                    s.sites[site] = r
                }
                if accesses == Double(exits), !s.entryChecks.contains(id) {
                    // Nothing served yet: watch the original instructions (undone in `candidate` if they get hot again).
                    s.entryChecks.insert(id)
                    rearm += p.sites
                }
                switch judgeLosingSites(losing, of: p, s) {
                case .undoPatch(let why)?:
                    verdicts.append((id, why, nil))
                    continue
                case .turnOff(let sites)?:
                    offs += sites.map { (id, $0.site, $0.reason) }
                case nil:
                    break
                }
                ons += sitesToTurnOn(of: p, s).map { (id, $0) }
                if inTrial && trusted {
                    // Nothing served yet: the entry check watches; the trial starts with the first access served.
                    guard accesses > Double(exits) || s.trials[id] != nil else { continue }
                    var t = s.trials[id] ?? RateTrial()
                    let step = t.observe(accesses: UInt64(accesses) &+ UInt64(atOriginal), now: age, configuration: configuration)
                    s.trials[id] = t
                    switch step {
                    case .wait: break
                    case .switchTo(let phase): switches.append((id, phase, nil))
                    case .done(let v):
                        if let undo = concludeTrial(v, pairs: t.pairs.count, patch: id, sites: p.sites, age: age, now: now, &s) {
                            verdicts.append((id, undo.why, undo.backOffBase))
                        }
                    }
                    continue
                }
                if let t = s.trials.removeValue(forKey: id), t.phase == .off {
                    // A counter the guest wrote ended the trial: the patch goes back in.
                    switches.append((id, .on, t))
                }
                guard accesses >= Double(configuration.verifyAfterAccesses) || age >= 1 else { continue }
                if !trusted {
                    // A counter the guest wrote counts for nothing: judge by the exits alone.
                    if baseline > 0 && Double(exits) / age > baseline * 0.5 {
                        verdicts.append((id, DMPRefusal(.verify, "a hit counter was written by the guest and \(exits) exits in \(fixed(age, 2)) s are more than half the rate before the patch"), nil))
                    }
                } else {
                    s.judged.insert(id)
                }
            }
        }
        if !rearm.isEmpty {
            rearmRequests.withLock { $0 += rearm }
            rearmCount.add(1, ordering: .releasing)
        }
        for (id, phase, ending) in switches where !verdicts.contains(where: { $0.id == id }) {
            switchPatch(id, to: phase, ending: ending)
        }
        for (id, why, base) in verdicts { undo(id, reason: why, backOff: true, backOffBase: base) }
        for (id, site, reason) in offs { turnOff(site, ofPatch: id, reason: reason) }
        for (id, site) in ons { turnOn(site, ofPatch: id) }
        watchUnservedCopies()
    }

    /// Acts on a finished A/B trial of patch `id` (state lock held): a loss returns the undo's reason and back-off;
    /// a win marks the patch judged and opens its sites' windows; an idle trial is tried again in a second.
    private func concludeTrial(_ v: RateTrial.Verdict, pairs: Int, patch id: Int, sites: [ExitSite], age: Double,
                               now: ContinuousClock.Instant, _ s: inout State) -> (why: DMPRefusal, backOffBase: Int)? {
        s.trials[id] = nil
        switch v {
        case .loses(_, _, let off):
            return (DMPRefusal(.verify, RateTrial.reason(v, pairs: pairs, configuration: configuration)),
                    RateTrial.backOff(offRate: off, sites: sites.count, configuration: configuration))
        case .pays(let ratio, let on, let off):
            s.judged.insert(id)
            for site in sites {
                guard var r = s.sites[site] else { continue }
                r.window = VerifyWindow(at: r.costs, now: now)
                r.exitsAtOriginalAtPatch = r.exitsAtOriginal
                r.report.trialResult = "\(fixed(on, 0)) accesses/s patched, \(fixed(off, 0)) with the original code "
                    + "(median ratio \(fixed(ratio, 2)) over \(pairs) pairs)"
                s.sites[site] = r
            }
            logger.info("A/B trial paid", metadata: ["patch": "\(id)", "ratio": "\(fixed(ratio, 2))",
                                                    "on_per_s": "\(fixed(on, 0))", "off_per_s": "\(fixed(off, 0))"])
        case .idle:
            // The guest hardly used the sites: try again in a second.
            s.trials[id] = RateTrial(notBefore: age + 1)
        }
        return nil
    }

    /// Switches patch `id` for an A/B trial phase (``RateTrial``): off puts the guest's original bytes back (the
    /// implanted code and the page guards stay), on writes the patch again, each with every vCPU paused. Under the
    /// planning lock, so no plan or rebuild of the same code runs meanwhile. A switch made is confirmed to the
    /// trial. A switch that finds a vCPU inside the bytes to write (a CPL0 pause can land anywhere where the code
    /// runs emulated, also at a padding `jmp`'s first byte) changes nothing: the trial keeps its phase and asks
    /// again at the next pass, and after ``DMPConfiguration/trialSwitchBusyPasses`` such passes in a row the patch
    /// is undone with the reason. Any other failure undoes the patch at once. `ending`: a trial a counter the guest
    /// wrote ended (no longer listed), whose patch goes back in; a busy switch lists it again to be retried.
    func switchPatch(_ id: Int, to phase: RateTrial.Phase, ending: RateTrial? = nil) {
        let direction = phase == .off ? "off" : "on"
        let outcome = planning.withLock { _ -> Result<PatchSwitch, DMPRefusal>? in
            guard let writes = state.withLock({ $0.patches[id]?.writes }) else { return nil }
            do throws(DMPRefusal) {
                switch phase {
                case .off: return .success(try patcher.suspend(writes))
                case .on: return .success(try patcher.resume(writes))
                }
            } catch {
                return .failure(error)
            }
        }
        switch outcome {
        case nil:
            return
        case .failure(let error):
            undo(id, reason: DMPRefusal(.verify, "an A/B trial could not switch the patch \(direction): \(error.reason)"), backOff: true)
        case .success(.switched):
            let ring = state.withLock { s -> Bool in
                if ending == nil { s.trials[id]?.switched() }
                return s.patches[id]?.sites.contains { s.sites[$0]?.ringProducer == true } ?? false
            }
            guard ring, let rings else { return }
            // The off phase leaves what an undo leaves: with no other ring patch live, the guest's own writes to
            // the target registers no longer keep the poller polling (``appendsToRing(_:_:_:)``).
            if phase == .off {
                detachRingProducersUnlessLive()
            } else {
                producers.withLock { _ in rings.producerAttached() }
            }
        case .success(.busy(let inside)):
            let limit = max(1, configuration.trialSwitchBusyPasses)
            let passes = state.withLock { s -> Int? in
                guard s.patches[id] != nil, var t = ending ?? s.trials[id] else { return nil }
                let n = t.busy()
                s.trials[id] = n >= limit ? nil : t
                return n
            }
            guard let passes else { return }
            logger.info("A/B trial switch delayed", metadata: ["patch": "\(id)", "to": "\(direction)", "vcpu": "\(inside.vcpu)",
                                                               "instruction": "\(hex(inside.instruction))", "passes": "\(passes)"])
            guard passes >= limit else { return }
            undo(id, reason: DMPRefusal(.verify, "an A/B trial could not switch the patch \(direction) in \(passes) passes in a row "
                                                 + "(a vCPU inside the bytes to write at each; the last: \(inside))"), backOff: true)
        }
    }

    /// Reads the site's hit counter (``HitCount``: changes accepted only while plausible) into its report row;
    /// returns the hits served in the guest since the patch. Called under the state lock.
    @discardableResult
    func observeHits(_ r: inout SiteRecord, memory: GuestMemory) -> UInt64 {
        guard var h = r.hits else { return 0 }
        let rings = self.rings
        let n = h.observe(memory) { i in rings.map { $0.statistics(ring: i).consumed } }
        r.hits = h
        r.report.hitsServed = n
        r.report.waitIterations = h.waited
        if let why = h.distrust, r.report.hitCounterDistrust == nil {
            r.report.hitCounterDistrust = why
            logger.notice("hit counter untrusted", metadata: ["site": "\(describe(r.report))", "reason": "\(why)"])
        }
        return n
    }
}

import Synchronization
import VMMKit

// DMP step 7 (verify, adapt, undo): the periodic judgement of every live patch, and the reading of its hit and
// wait counters, which the guest can write (``HitCount``). Runs on the VM's timer thread, never on the exit path.
extension DMPMiddleware {
    /// Judges every patch by its sites' costs (``VerifyWindow``) over its whole life; undoes patches that stopped paying.
    ///
    /// - Each trusted site's window of accesses is judged against one exit per access: exits (fallbacks and kicks) and
    ///   wait iterations per access; ``DMPConfiguration/verifyLosingWindows`` losing windows in a row undo the patch.
    ///   Idle windows judge nothing.
    /// - Once, at ``DMPConfiguration/verifyAfterAccesses`` accesses or a second of age: a patch that served nothing
    ///   is watched for never being entered; a patch of CPL0 code (whose bodies may run emulated, a cost no count
    ///   shows) is compared by its rate of accesses with the rate before the patch.
    /// - A site whose hit or wait counter the guest wrote is judged by its exits alone, against the rate before.
    func verifyPatches() {
        guard let vm else { return }
        var verdicts: [(Int, DMPRefusal)] = []
        var rearm: [ExitSite] = []
        let now = ContinuousClock.now
        state.withLock { s in
            for (id, p) in s.patches {
                let age = Double(nanoseconds(since: p.appliedAt)) / 1e9
                guard age >= 0.05 else { continue }
                var accesses = 0.0, exits = 0
                var baseline = 0.0
                var trusted = true
                var userMode = true
                var lost: String?
                for site in p.sites {
                    guard var r = s.sites[site] else { continue }
                    let n = observeHits(&r, memory: vm.memory)
                    accesses += Double(n + UInt64(r.report.exitsWhilePatched - r.report.kicksWhilePatched))
                    exits += r.report.exitsWhilePatched
                    baseline += r.baselineRate ?? 0
                    trusted = trusted && r.report.hitCounterDistrust == nil
                    userMode = userMode && r.report.userMode
                    if r.report.hitCounterDistrust == nil, var w = r.window {
                        if case .loses = w.observe(r.costs, now: now, configuration: configuration), w.shouldUndo(configuration),
                           lost == nil {
                            lost = "\(r.report.location.isEmpty ? hex(site.rip) : r.report.location): \(w.reason(configuration))"
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
                if let lost {
                    verdicts.append((id, DMPRefusal(.verify, lost)))
                    continue
                }
                guard accesses >= Double(configuration.verifyAfterAccesses) || age >= 1 else { continue }
                let rate = accesses / age
                if !trusted {
                    // A counter the guest wrote counts for nothing: judge by the exits alone.
                    if baseline > 0 && Double(exits) / age > baseline * 0.5 {
                        verdicts.append((id, DMPRefusal(.verify, "a hit counter was written by the guest and \(exits) exits in \(fixed(age, 2)) s are more than half the rate before the patch")))
                    }
                } else if !userMode, baseline > 0 && rate < baseline * 0.9 && !s.judged.contains(id) {
                    verdicts.append((id, DMPRefusal(.verify, "slower with the patch: \(fixed(rate, 0)) accesses/s against \(fixed(baseline, 0)) before (CPL0 code, whose bodies may run emulated)")))
                }
                if trusted, verdicts.last?.0 != id { s.judged.insert(id) }
            }
        }
        if !rearm.isEmpty {
            rearmRequests.withLock { $0 += rearm }
            rearmCount.add(1, ordering: .releasing)
        }
        for (id, why) in verdicts { undo(id, reason: why, backOff: true) }
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
            logger.notice("hit counter untrusted", metadata: ["site": "\(describe(r.report.site))", "reason": "\(why)"])
        }
        return n
    }
}

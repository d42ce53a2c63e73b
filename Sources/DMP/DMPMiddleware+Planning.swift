import VMMKit

// DMP steps 3–6 from the middleware's side: a hot site located and planned (rebuilds, folded stubs, call
// promotion), the outcome committed to the site records; refusals recorded.
extension DMPMiddleware {
    /// Locates the instruction of `site`, asks the device, chooses a shape, encodes it and patches it in.
    func plan(_ site: ExitSite, _ exit: VMExit, _ context: ExitContext, registersAtExit: Registers?,
                      hotAt: ContinuousClock.Instant, deferred: Duration) throws(DMPRefusal) {
        guard let locator, let planner, let implant else {
            throw disabledReason ?? DMPRefusal(.plan, "DMP could not start")
        }
        // A ring grant announces its producer to the device before the patch is written: a plan that ends with no
        // ring append live (refused, or its ring grant given back) takes the announcement back, or every later
        // write of the guest to the ring's target register would count as a producer fallback and wake the poller.
        planner.announcedRingProducer = false
        defer { if planner.announcedRingProducer { detachRingProducersUnlessLive() } }
        let located = try locator.locate(exit, context: context) { end in self.implantedInstruction(endingAt: end) }
        state.withLock {
            if var r = $0.sites[site] {
                name(&r, instructionAt: located.virtualAddress, $0)
                $0.sites[site] = r
            }
            $0.sites[site]?.report.physicalAddress = located.physicalAddress
            $0.sites[site]?.report.instruction = located.instruction.description
            $0.sites[site]?.report.userMode = located.cpl == 3
        }
        // A new hot instruction inside a function copy, or inside the original of a live copy (a thread that was
        // still in the original when the copy went in, such as the vCPU that stopped right after the first hot
        // site): the copy is rebuilt with it (same patch id), never a second patch planned over the first.
        let owner = implant.owner(ofInstructionPointer: located.virtualAddress) ?? copyOwner(ofOriginal: located)
        var old: AppliedPatch?
        if let o = owner {
            old = state.withLock { s -> AppliedPatch? in
                guard let p = s.patches[o] else { return nil }
                s.rebuilding.insert(o)
                return p
            }
            if old == nil {
                try planner.probeFastPath(site)
                throw DMPRefusal(.plan, "the instruction runs inside implanted code whose patch was undone (it leaves at its next pad)")
            }
        }
        // Patches a call promotion merges into this one (their rebuilds end after the state update, as the owner's).
        var claimed: [Int] = []
        // Instruction stubs a new function copy may fold in (held like a rebuild's patch meanwhile).
        var folding: [Int] = []
        // The patches the applied outcome replaces: a promotion's claimed ones, or the stubs folded into the copy.
        var merged: [Int] = []
        defer {
            if let owner { finishRebuild(owner) }
            for c in claimed { finishRebuild(c) }
            for c in folding { finishRebuild(c) }
        }
        var id = owner ?? state.withLock { s -> Int in
            defer { s.nextPatchID += 1 }
            return s.nextPatchID
        }
        let minimum = max(1, configuration.threshold / 4)
        let siblings = !configuration.planSiblings ? [] : detectors[context.vcpuID].entries
            .filter { $0.site != site && ($0.site.kind == .io || $0.site.kind == .mmio) && $0.total >= minimum }
            .filter { e in
                // An undone site joins another's plan only once its back-off is over (in its exits, as this vCPU counts them).
                state.withLock { s in
                    s.sites[e.site] == nil || s.sites[e.site]?.report.state == .undone && s.sites[e.site]?.backOffOver(atExits: e.total) == true
                }
            }
            .map(\.site)
        // Read before the patch goes live: ring-append hit counters are bounded by what the consumer applies after it.
        let consumedBefore = rings?.consumed ?? []
        let beforePatch = ContinuousClock.now
        let outcome: PlanOutcome
        let live = state.withLock { Array($0.patches.values) }
        do {
            if let old {
                outcome = try planner.rebuild(old, adding: site, located: located, registersAtExit: registersAtExit, siblings: siblings,
                                              owner: id, live: live)
            } else {
                // Live instruction stubs in the function a copy is planned for are folded into the copy (a copy that
                // copied their jumps would leave itself through them: each stub returns into the original). Where
                // the copy cannot serve them, it is planned as before, without them.
                let stubs = state.withLock { s -> [(id: Int, patch: AppliedPatch)] in
                    let ids = planner.stubsToFold(for: located, in: s.patches).filter { !s.rebuilding.contains($0) }
                    for i in ids { s.rebuilding.insert(i) }
                    return ids.compactMap { i in s.patches[i].map { (i, $0) } }
                }
                folding = stubs.map(\.id)
                if !stubs.isEmpty, let o = try? planner.plan(site, located: located, registersAtExit: registersAtExit, siblings: siblings,
                                                            hotAt: hotAt, owner: id, live: live,
                                                            folding: stubs.map(\.patch)) {
                    outcome = o
                    merged = folding
                } else {
                    outcome = try planner.plan(site, located: located, registersAtExit: registersAtExit, siblings: siblings, hotAt: hotAt,
                                               owner: id, live: live)
                }
            }
        } catch {
            // An instruction of the original code (not of a copy) that no entry reaches.
            guard error.stage == .plan, configuration.strategies.contains(.callPromotion),
                  implant.owner(ofInstructionPointer: located.virtualAddress) == nil else { throw error }
            // No way into a copy of the instruction's function: serve it from a copy of its caller.
            func combined(_ why: DMPRefusal) -> DMPRefusal { DMPRefusal(why.stage, "\(error.reason); call promotion: \(why.reason)") }
            logger.debug("no entry of its own, trying call promotion", metadata: ["site": "\(describe(site))", "reason": "\(error.reason)"])
            let request: PromotionRequest
            do {
                request = try planner.promotionRequest(for: located, registersAtExit: registersAtExit, patches: live)
            } catch { throw combined(error) }
            // Live copies of the caller or the accessor are merged into the new one (the caller's keeps its id).
            let olds = state.withLock { s -> [(id: Int, patch: AppliedPatch)] in
                let involved = s.patches.filter { _, p in
                    p.copy?.functions.contains { $0.start == request.caller || $0.start == request.accessor } ?? false
                }.map { (id: $0.key, patch: $0.value) }.sorted { a, b in
                    let ac = a.patch.copy?.function.start == request.caller, bc = b.patch.copy?.function.start == request.caller
                    return ac != bc ? ac : a.id < b.id
                }
                for o in involved { s.rebuilding.insert(o.id) }
                return involved
            }
            claimed = olds.map(\.id)
            if let primary = olds.first { id = primary.id }
            do {
                outcome = try planner.promote(site, located: located, registersAtExit: registersAtExit, request: request,
                                              siblings: siblings, olds: olds.map(\.patch), owner: id, live: live)
                merged = claimed
            } catch { throw combined(error) }
        }
        commit(outcome, for: site, id: id, merged: merged, hotAt: hotAt, deferred: deferred, vcpu: context.vcpuID,
               consumedBefore: consumedBefore, beforePatch: beforePatch)
    }

    /// Records a planned patch (applied, or a dry run's): the merged patches it replaces, its sites' records, the
    /// ring producers, the latency, the log line; watches its accessors' sites for other callers.
    func commit(_ outcome: PlanOutcome, for site: ExitSite, id: Int, merged: [Int], hotAt: ContinuousClock.Instant,
                deferred: Duration, vcpu: Int, consumedBefore: [Int], beforePatch: ContinuousClock.Instant) {
        let elapsed = nanoseconds(since: hotAt)
        if outcome.applied != nil {
            let (s, a) = deferred.components
            let waited = UInt64(max(0, s)) &* 1_000_000_000 &+ UInt64(max(0, a / 1_000_000_000))
            latencies.withLock {
                $0.append(PatchLatency(hotToPatchedNanoseconds: elapsed, deferredNanoseconds: min(waited, elapsed),
                                       pausedNanoseconds: outcome.pausedNanoseconds))
            }
        }
        state.withLock { s in
            if let applied = outcome.applied {
                // Patches merged into this one (a call promotion, folded stubs) are gone; their sites are this patch's.
                for c in merged where c != id {
                    s.patches[c] = nil
                    s.entryChecks.remove(c)
                    s.judged.remove(c)
                    s.trials[c] = nil
                    s.mergedInto[c] = id
                }
                s.patches[id] = applied
                refreshPatchedSites(s)
                // A rebuild serves the old sites on: their rows name the new shape.
                for x in applied.sites {
                    s.sites[x]?.report.strategy = outcome.strategy
                    s.sites[x]?.patchID = id
                }
            }
            for sp in outcome.sites {
                var r = s.sites[sp.site] ?? SiteRecord(report: PatchSite(site: sp.site, location: symbolize(sp.site.rip)))
                if s.sites[sp.site] == nil { s.order.append(sp.site) }
                if sp.site != site { r.report.exitsBefore = detectors[vcpu].counts(of: sp.site)?.total ?? 0 }
                name(&r, instructionAt: sp.virtualAddress, s)
                r.report.physicalAddress = sp.physicalAddress
                r.report.instruction = sp.instruction
                r.report.strategy = outcome.strategy
                r.report.fastPath = sp.fastPath
                r.report.userMode = sp.userMode
                r.report.state = outcome.applied == nil ? .wouldPatch : .patched
                r.report.refusal = nil
                r.report.trialResult = nil
                r.report.hotToPatchedNanoseconds = elapsed
                r.enableWord = sp.enableWord
                r.slot = sp.slot
                r.grant = sp.grant
                r.granted = sp.granted
                r.ringProducer = sp.ring != nil
                r.hits = sp.hitCounter.map { c in
                    HitCount(counter: c, ring: sp.ring.flatMap { i in
                        consumedBefore.indices.contains(i) ? (i, rings?.slotCount ?? 0, consumedBefore[i]) : nil
                    }, waits: sp.waitCounter, now: beforePatch)
                }
                r.report.hitCounterDistrust = nil
                r.report.waitIterations = 0
                // Verification windows run from the moment the patch is live.
                r.window = outcome.applied == nil ? nil : VerifyWindow(at: r.costs)
                r.exitsAtOriginalAtPatch = r.exitsAtOriginal
                r.report.windowsJudged = 0
                r.report.lastWindowCost = nil
                r.patchID = outcome.applied == nil ? nil : id
                if r.baselineRate == nil, sp.site != site { r.baselineRate = s.sites[site]?.baselineRate }
                s.sites[sp.site] = r
            }
        }
        if outcome.applied != nil, outcome.sites.contains(where: { $0.ring != nil }), let rings {
            // Again now that the patch is live: an undo of the last other ring patch may have detached meanwhile.
            producers.withLock { _ in rings.producerAttached() }
        }
        logger.info(outcome.applied == nil ? "would patch" : "patched",
                    metadata: ["site": "\(describe(site))", "strategy": "\(outcome.strategy)",
                               "sites": "\(outcome.sites.count)", "paused_ns": "\(outcome.pausedNanoseconds)",
                               "hot_to_patched_ns": "\(elapsed)"])
        if let applied = outcome.applied { watchCallers(of: applied) }
    }

    /// The live function-copy patch whose original function holds `located` (the same code: its page is one the
    /// patch guards), if any.
    private func copyOwner(ofOriginal located: LocatedInstruction) -> Int? {
        let page = located.physicalAddress.rawValue & ~0xfff
        return state.withLock { s in
            s.patches.first { _, p in p.copy?.function(containing: located.virtualAddress) != nil && p.guardedPages.contains(page) }?.key
        }
    }

    /// The instruction of a live function copy (current or retired) that ends at the guest-virtual `end`, if any:
    /// the locator's proof of an instruction start inside implanted code, where no symbol covers it.
    func implantedInstruction(endingAt end: UInt64) -> ImplantedInstruction? {
        guard let owner = implant?.owner(ofInstructionPointer: end &- 1) else { return nil }
        return state.withLock { s -> ImplantedInstruction? in
            guard let c = s.patches[owner]?.copy(holding: end &- 1), let i = c.instruction(endingAt: end) else { return nil }
            return ImplantedInstruction(start: i.copyStart, name: "the copy of \(c.function.symbol.name)", previous: i.previous)
        }
    }

    /// Ends a rebuild of patch `id` (applied or refused) and runs an undo that waited for it.
    func finishRebuild(_ id: Int) {
        let (deferred, target) = state.withLock { s in
            s.rebuilding.remove(id)
            return (s.deferredUndos.removeValue(forKey: id), s.patches[id] == nil ? s.mergedInto[id] ?? id : id)
        }
        if let d = deferred { undo(target, reason: d.reason, backOff: d.backOff, backOffBase: d.backOffBase) }
    }

    /// Records and logs a refusal.
    func refuse(_ site: ExitSite, _ refusal: DMPRefusal) {
        state.withLock {
            $0.sites[site]?.report.state = .refused
            $0.sites[site]?.report.refusal = refusal
        }
        logger.notice("refused", metadata: ["site": "\(describe(site))", "reason": "\(refusal)"])
    }
}

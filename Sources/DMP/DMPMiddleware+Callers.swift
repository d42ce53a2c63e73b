import VMMKit

/// What DMP keeps about an accessor's site served through a promoted call while it looks for other callers
/// (``DMPMiddleware/otherCaller(_:_:_:registersAtExit:)``).
struct CallerWatch: Sendable {
    /// The site's exit count (the detector's total) from which the next exit at its original instruction is looked at.
    var checkAt = 0
    /// Looks in a row that found no caller to promote (each doubles the wait, up to ``DMPMiddleware/callerMisses``).
    var misses = 0
    /// Callers promoted for the site after the first.
    var callers = 0
}

extension DMPMiddleware {
    /// Looks that find no caller to promote, in a row, before a site is no longer watched.
    static let callerMisses = 12
    /// Callers a site is served from at most (the first and the others).
    static let maximumCallers = 8

    /// Watches the sites of `patch` that lie in accessors its copy serves through promoted calls (their own keys,
    /// at the accessor's instruction): the original instruction exiting again means a caller no promotion covers
    /// (the accessor is called from several functions), and the site is re-armed in every detector so that it
    /// becomes a candidate again.
    func watchCallers(of patch: AppliedPatch) {
        guard let copy = patch.copy, !copy.promotions.isEmpty else { return }
        let fresh = state.withLock { s -> [ExitSite] in
            patch.sites.filter { site in
                guard s.callerWatch[site] == nil, let a = s.sites[site]?.report.instructionAddress,
                      let f = copy.accessors.first(where: { $0.contains(a) }),
                      f.contains(site.rip) || site.rip == f.end else { return false }
                s.callerWatch[site] = CallerWatch()
                return true
            }
        }
        guard !fresh.isEmpty else { return }
        rearmRequests.withLock { $0 += fresh }
        rearmCount.add(1, ordering: .releasing)
    }

    /// A patched site that became hot again at its original instruction: when it is an accessor's instruction
    /// served through a promoted call, the caller on the stack now is another one. Its call is promoted in a copy
    /// of that caller (a patch of its own, serving the accessor's instructions under keys of their own,
    /// ``PromotionRequest/callerSite(_:request:)``), or, for another call of a caller already promoted, that copy is
    /// rebuilt with it. Looks back off exponentially in the site's exits while they find nothing new.
    func otherCaller(_ site: ExitSite, _ exit: VMExit, _ context: ExitContext, registersAtExit: Registers?) {
        let vcpu = context.vcpuID
        let total = detectors[vcpu].counts(of: site)?.total ?? 0
        enum Look { case unwatched, later, now(AppliedPatch, Int) }
        let look = state.withLock { s -> Look in
            guard let w = s.callerWatch[site] else { return .unwatched }
            guard let r = s.sites[site], r.report.state == .patched || r.report.state == .disabled, let id = r.patchID,
                  let p = s.patches[id] else {
                s.callerWatch[site] = nil
                return .unwatched
            }
            // A site turned off alone exits from its copy too: no caller is looked for until it is on again.
            return total < w.checkAt || r.report.state == .disabled ? .later : .now(p, id)
        }
        guard case let .now(first, firstID) = look else {
            if case .later = look { _ = detectors[vcpu].rearm(site) }
            return
        }
        let found: CallerLook? = planning.withLockIfAvailable { _ -> CallerLook in
            do throws(DMPRefusal) {
                return try promoteOtherCaller(site, exit, context, registersAtExit: registersAtExit, first: first, firstID: firstID,
                                              total: total)
            } catch {
                logger.info("another caller not promoted", metadata: ["site": "\(describe(site))", "reason": "\(error)"])
                return .nothingNew
            }
        }
        let keep = state.withLock { s -> Bool in
            guard var w = s.callerWatch[site] else { return false }
            var backOff: Int?
            switch found {
            case .promoted?:
                w.misses = 0
                w.callers += 1
            case .nothingNew?:
                w.misses += 1
            case .backingOff(let until)?:
                // This caller's copy was undone: no miss (other callers are looked for as before), and no look
                // later than the end of its back-off.
                backOff = until
            case nil:
                break
            }
            guard w.misses <= DMPMiddleware.callerMisses, w.callers < DMPMiddleware.maximumCallers else {
                s.callerWatch[site] = nil
                return false
            }
            w.checkAt = min(backOff ?? .max, total &+ max(1, configuration.threshold) << min(w.misses, 10))
            s.callerWatch[site] = w
            return true
        }
        if keep { _ = detectors[vcpu].rearm(site) }
    }

    /// Promotes the call that reached `site`'s accessor this time (see ``otherCaller(_:_:_:registersAtExit:)``);
    /// returns whether a patch was applied, or that this caller's earlier copy was undone and its back-off (in
    /// `site`'s exits, `total` now) is not over. `first`: the patch serving `site`.
    private func promoteOtherCaller(_ site: ExitSite, _ exit: VMExit, _ context: ExitContext, registersAtExit: Registers?,
                                    first: AppliedPatch, firstID: Int, total: Int) throws(DMPRefusal) -> CallerLook {
        guard let locator, let planner, let implant else { return .nothingNew }
        let hotAt = ContinuousClock.now
        let located = try locator.locate(exit, context: context) { end in self.implantedInstruction(endingAt: end) }
        // An exit from implanted code is a fallback or an instruction no body serves: not another caller.
        guard implant.owner(ofInstructionPointer: located.virtualAddress) == nil,
              let accessor = first.copy?.accessors.first(where: { $0.contains(located.virtualAddress) }) else { return .nothingNew }
        let patches = state.withLock { Array($0.patches.values) }
        let request = try planner.promotionRequest(for: located, registersAtExit: registersAtExit, patches: patches)
        guard request.accessor == accessor.start else { return .nothingNew }
        // A call already promoted (a thread that had not entered that copy yet): nothing new.
        let promoted = patches.contains { p in
            p.copy.map { c in
                c.function.start == request.caller
                    && c.promotions.contains { $0.site == request.promotion.site && $0.accessors.contains(request.accessor) }
            } ?? false
        }
        guard !promoted else { return .nothingNew }
        // The caller's own live copy, if any, is rebuilt with the promoted call; the first caller's patch (whose copy
        // holds the accessor too) is left as it is, unless the caller is its own.
        let olds = state.withLock { s -> [(id: Int, patch: AppliedPatch)] in
            let involved = s.patches.filter { _, p in p.copy?.function.start == request.caller }
                .map { (id: $0.key, patch: $0.value) }.sorted { $0.id < $1.id }
            for o in involved { s.rebuilding.insert(o.id) }
            return involved
        }
        defer { for o in olds { finishRebuild(o.id) } }
        let ownCaller = olds.contains { $0.id == firstID }
        // The accessor's sites the first caller's copy serves, each under a key of this caller's (one per access).
        let (key, others) = state.withLock { s -> (ExitSite, [(site: ExitSite, address: UInt64, memoryTarget: UInt64?)]) in
            guard !ownCaller else { return (site, []) }
            var keys: Set<ExitSite> = [PatchPlanner.callerSite(site, request: request)]
            var others: [(site: ExitSite, address: UInt64, memoryTarget: UInt64?)] = []
            for (x, g) in zip(first.sites, first.grants) where x != site {
                let address = g.plan.virtualAddress
                guard accessor.contains(address), address != located.virtualAddress else { continue }
                let k = PatchPlanner.callerSite(x, request: request)
                guard keys.insert(k).inserted, s.sites[k]?.report.state != .patched, s.sites[k]?.report.state != .disabled else { continue }
                var target: UInt64?
                if case .memory(let m) = g.route.target { target = m }
                others.append((k, address, target))
            }
            return (PatchPlanner.callerSite(site, request: request), others)
        }
        // This caller's copy undone before (verification, a guarded write): not promoted again before its back-off,
        // counted in the accessor site's exits from the first look after the undo (DESIGN.md, DMP step 7).
        let backOff = state.withLock { s -> CallerLook? in
            for k in [key] + others.map(\.site) where k != site {
                guard var r = s.sites[k], r.report.state == .undone else { continue }
                let over = r.backOffOver(atExits: total)
                s.sites[k] = r
                guard !over else { continue }
                return r.retryAtExits.map { .backingOff(untilExits: $0) } ?? .nothingNew
            }
            return nil
        }
        if let backOff {
            logger.info("another caller backs off", metadata: ["site": "\(describe(site))", "caller": "\(symbolize(request.caller))"])
            return backOff
        }
        let id = olds.first?.id ?? state.withLock { s -> Int in
            defer { s.nextPatchID += 1 }
            return s.nextPatchID
        }
        // The new keys' rows: the accessor's instruction and the caller's call.
        let call = symbolize(request.promotion.site)
        state.withLock { s in
            for k in [key] + others.map(\.site) where s.sites[k] == nil {
                let inner = k == key ? located.virtualAddress : others.first { $0.site == k }?.address ?? 0
                var r = SiteRecord(report: PatchSite(site: k, location: "\(symbolize(inner)) via \(call)"))
                r.report.state = .candidate
                r.hotAt = hotAt
                r.baselineRate = s.sites[site]?.baselineRate
                s.sites[k] = r
                s.order.append(k)
            }
            s.sites[key]?.report.instructionAddress = located.virtualAddress
            s.sites[key]?.report.physicalAddress = located.physicalAddress
            s.sites[key]?.report.instruction = located.instruction.description
            s.sites[key]?.report.userMode = located.cpl == 3
        }
        logger.info("another caller", metadata: ["site": "\(describe(site))", "caller": "\(symbolize(request.caller))", "call": "\(call)"])
        let consumedBefore = rings?.consumed ?? []
        let beforePatch = ContinuousClock.now
        let outcome: PlanOutcome
        do {
            outcome = try planner.promote(key, located: located, registersAtExit: registersAtExit, request: request,
                                          olds: olds.map(\.patch), owner: id, live: patches, alsoServing: others)
        } catch {
            if key != site { refuse(key, DMPRefusal(error.stage, "another caller of \(symbolize(accessor.start)): \(error.reason)")) }
            throw error
        }
        commit(outcome, for: key, id: id, merged: olds.map(\.id), hotAt: hotAt, deferred: .zero, vcpu: context.vcpuID,
               consumedBefore: consumedBefore, beforePatch: beforePatch)
        return outcome.applied != nil ? .promoted : .nothingNew
    }
}

/// What one look for another caller of a watched accessor found (``DMPMiddleware/otherCaller(_:_:_:registersAtExit:)``).
enum CallerLook: Equatable {
    /// A caller's call was promoted (a patch applied).
    case promoted
    /// Nothing to promote (the caller is promoted already, none was found, or the plan was refused).
    case nothingNew
    /// The caller's copy was undone and its back-off lasts until the accessor site's detector count reaches this.
    case backingOff(untilExits: Int)
}

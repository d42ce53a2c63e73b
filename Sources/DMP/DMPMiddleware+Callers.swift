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
        let found = tryPromoteOtherCaller(site, exit, context, registersAtExit: registersAtExit, first: first, firstID: firstID,
                                          total: total, failure: "another caller not promoted")
        let keep = state.withLock { s -> Bool in
            guard var w = s.callerWatch[site] else { return false }
            var backOff: Int?
            switch found {
            case .promoted?:
                w.misses = 0
                w.callers += 1
            case .nothingNew?, .noCaller?:
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

    /// ``promoteOtherCaller(_:_:_:registersAtExit:first:firstID:total:)`` under the planning lock, if free (nil when
    /// another vCPU is planning); a refusal is logged with `failure`.
    private func tryPromoteOtherCaller(_ site: ExitSite, _ exit: VMExit, _ context: ExitContext, registersAtExit: Registers?,
                                       first: AppliedPatch, firstID: Int, total: Int, failure: String) -> CallerLook? {
        planning.withLockIfAvailable { _ -> CallerLook in
            do throws(DMPRefusal) {
                return try promoteOtherCaller(site, exit, context, registersAtExit: registersAtExit, first: first, firstID: firstID,
                                              total: total)
            } catch {
                logger.info("\(failure)", metadata: ["site": "\(describe(site))", "reason": "\(error)"])
                return .nothingNew
            }
        }
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
        // The function of the first copy holding the instruction: an accessor it calls through a promoted call, or
        // the copied function itself (promoted one level up: its copy's entries do not lie on the path taken).
        guard implant.owner(ofInstructionPointer: located.virtualAddress) == nil, let firstCopy = first.copy,
              let accessor = firstCopy.functions.first(where: { $0.contains(located.virtualAddress) }) else { return .noCaller }
        let patches = state.withLock { Array($0.patches.values) }
        let request: PromotionRequest
        do { request = try planner.promotionRequest(for: located, registersAtExit: registersAtExit, patches: patches) } catch {
            logger.info("no caller to promote", metadata: ["site": "\(describe(site))", "reason": "\(error)"])
            return .noCaller
        }
        guard request.accessor == accessor.start else { return .noCaller }
        // The accessor's own promoted calls (and theirs) go along: the functions the new copy serves.
        let nested = CallPromotion.nested(in: firstCopy, from: accessor.start)
        var keys: [ExitSite] = []
        do {
            return try promoteCaller(request, site, located: located, registersAtExit: registersAtExit, first: first, firstID: firstID,
                                     total: total, nested: nested.promotions, functions: nested.functions, hotAt: hotAt,
                                     vcpu: context.vcpuID, patches: patches, keys: &keys)
        } catch where error.stage == .plan {
            // The caller cannot be entered (a function reached only by a tail jump): one level further up. Its rows say
            // both reasons when that fails too.
            func refused(_ above: DMPRefusal) -> DMPRefusal {
                let both = DMPRefusal(error.stage, "\(error.reason); one level up: \(above.reason)")
                for k in keys where k != site {
                    refuse(k, DMPRefusal(both.stage, "another caller of \(symbolize(request.accessor)): \(both.reason)"))
                }
                return both
            }
            let up: (request: PromotionRequest, more: [CallPromotion], middle: DecodedFunction)
            do {
                up = try planner.levelUpRequest(above: request, for: located, registersAtExit: registersAtExit, patches: patches)
            } catch let above {
                throw refused(above)
            }
            var upKeys: [ExitSite] = []
            do {
                let look = try promoteCaller(up.request, site, located: located, registersAtExit: registersAtExit, first: first,
                                             firstID: firstID, total: total, nested: up.more + [request.promotion] + request.more + nested.promotions,
                                             functions: [up.middle] + nested.functions, hotAt: hotAt, vcpu: context.vcpuID,
                                             patches: patches, keys: &upKeys)
                // The rows refused for the caller that cannot be entered go: the copy one level up serves their accesses.
                state.withLock { s in
                    for k in keys where k != site && !upKeys.contains(k) && s.sites[k]?.report.state == .refused {
                        s.sites[k] = nil
                        s.order.removeAll { $0 == k }
                    }
                }
                return look
            } catch let above {
                throw refused(above)
            }
        }
    }

    /// Promotes `request`'s call (see ``otherCaller(_:_:_:registersAtExit:)``) in a copy of its caller serving the
    /// accessor's `site` (exit `located`) and the first patch's sites in `functions`, with `nested`, the promoted calls
    /// inside them; returns whether a patch was applied, or that this caller's earlier copy was undone and its
    /// back-off (in `site`'s exits, `total` now) is not over. `keys`: the site keys this caller's copy serves under,
    /// set before anything can fail (refused with the reason when the copy is refused).
    private func promoteCaller(_ request: PromotionRequest, _ site: ExitSite, located: LocatedInstruction, registersAtExit: Registers?,
                               first: AppliedPatch, firstID: Int, total: Int, nested: [CallPromotion], functions: [DecodedFunction],
                               hotAt: ContinuousClock.Instant, vcpu: Int, patches: [AppliedPatch],
                               keys tried: inout [ExitSite]) throws(DMPRefusal) -> CallerLook {
        tried = []
        guard let planner else { return .nothingNew }
        let accessor = request.accessor
        // A call already promoted (a thread that had not entered that copy yet): nothing new.
        let promoted = patches.contains { p in
            p.copy.map { c in
                c.function.start == request.caller
                    && c.promotions.contains { p in p.site == request.promotion.site && request.promotion.accessors.allSatisfy(p.accessors.contains) }
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
                guard functions.contains(where: { $0.contains(address) }), address != located.virtualAddress else { continue }
                let k = PatchPlanner.callerSite(x, request: request)
                guard keys.insert(k).inserted, s.sites[k]?.report.state != .patched, s.sites[k]?.report.state != .disabled else { continue }
                var target: UInt64?
                if case .memory(let m) = g.route.target { target = m }
                others.append((k, address, target))
            }
            return (PatchPlanner.callerSite(site, request: request), others)
        }
        tried = [key] + others.map(\.site)
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
        let created = state.withLock { s -> [ExitSite] in
            let fresh = ([key] + others.map(\.site)).filter { s.sites[$0] == nil }
            for k in fresh {
                let inner = k == key ? located.virtualAddress : others.first { $0.site == k }?.address ?? 0
                var r = SiteRecord(report: PatchSite(site: k, location: "\(symbolize(inner)) via \(call)", exitLocation: ""))
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
            return fresh
        }
        logger.info("another caller", metadata: ["site": "\(describe(site))", "caller": "\(symbolize(request.caller))", "call": "\(call)"])
        let consumedBefore = rings?.consumed ?? []
        let beforePatch = ContinuousClock.now
        let outcome: PlanOutcome
        do {
            outcome = try planner.promote(key, located: located, registersAtExit: registersAtExit, request: request,
                                          olds: olds.map(\.patch), owner: id, live: patches, alsoServing: others,
                                          nested: nested)
        } catch {
            // The new keys' rows (the accessor's other instructions' too) say why.
            if key != site {
                for k in [key] + others.map(\.site) {
                    refuse(k, DMPRefusal(error.stage, "another caller of \(symbolize(accessor)): \(error.reason)"))
                }
            }
            throw error
        }
        commit(outcome, for: key, id: id, merged: olds.map(\.id), hotAt: hotAt, deferred: .zero, vcpu: vcpu,
               consumedBefore: consumedBefore, beforePatch: beforePatch)
        // A rebuilt caller copy that already served the instruction under the key of another of its calls (the call
        // now promoted too) serves it there: the rows made for this call's keys go.
        let planned = Set(outcome.sites.map(\.site))
        state.withLock { s in
            for k in created where !planned.contains(k) && s.sites[k]?.report.state == .candidate {
                s.sites[k] = nil
                s.order.removeAll { $0 == k }
            }
        }
        return outcome.applied != nil ? .promoted : .nothingNew
    }
}

/// What one look for another caller of a watched accessor found (``DMPMiddleware/otherCaller(_:_:_:registersAtExit:)``).
enum CallerLook: Equatable {
    /// A caller's call was promoted (a patch applied).
    case promoted
    /// A caller was found on the stack, but nothing new was applied (promoted already, or its copy refused).
    case nothingNew
    /// No caller: the stack at the exit leads to no call a promotion could serve.
    case noCaller
    /// The caller's copy was undone and its back-off lasts until the accessor site's detector count reaches this.
    case backingOff(untilExits: Int)
}

// A function copy whose only ways in lie on a rarely taken path (the copy's own function reached through pointers,
// its one ≥ 5-byte instruction in a branch the guest seldom takes) serves that path only: its sites keep exiting at
// their original instructions on every other call. Its callers are then promoted one level up, as an accessor's are.
extension DMPMiddleware {
    /// Verification's look (every period, after the windows) at live function copies that do not serve the path the
    /// guest takes: a site at an instruction of the copied function itself (not an accessor's, which
    /// ``watchCallers(of:)`` watches already) whose original instruction exited more often since the patch than the
    /// copy served it, at least `threshold` times, although the copy served some (one that served none is never
    /// entered: ``promoteAboveUnentered(_:_:_:registersAtExit:patch:)``). Such a site is watched for callers like
    /// an accessor's (``otherCaller(_:_:_:registersAtExit:)``): the next time it gets hot at its original
    /// instruction, the caller on the stack gets a copy of its own whose promoted call calls a copy of the function.
    func watchUnservedCopies() {
        let fresh = state.withLock { s -> [ExitSite] in
            var out: [ExitSite] = []
            for (id, p) in s.patches {
                // A CPL0 patch's A/B trial puts the original bytes back on purpose: looked at once it is judged.
                guard let copy = p.copy, s.trials[id] == nil,
                      s.judged.contains(id) || p.sites.allSatisfy({ s.sites[$0]?.report.userMode ?? true }) else { continue }
                for site in p.sites {
                    // The site's own key (another caller's key names the accessor's instruction, not its copy's function).
                    guard s.callerWatch[site] == nil, let r = s.sites[site], r.report.state == .patched,
                          let a = r.report.instructionAddress, copy.function.contains(a) else { continue }
                    let atOriginal = r.exitsAtOriginal - r.exitsAtOriginalAtPatch
                    guard r.report.hitsServed > 0, atOriginal >= max(1, configuration.threshold),
                          UInt64(atOriginal) > r.report.hitsServed else { continue }
                    s.callerWatch[site] = CallerWatch()
                    out.append(site)
                    logger.info("copy not on the path taken", metadata: [
                        "site": "\(describe(r.report))", "served": "\(r.report.hitsServed)", "exits_at_original": "\(atOriginal)",
                        "outcome": "its callers are promoted one level up",
                    ])
                }
            }
            return out
        }
        guard !fresh.isEmpty else { return }
        rearmRequests.withLock { $0 += fresh }
        rearmCount.add(1, ordering: .releasing)
    }

    /// A function copy that served nothing while `site`, one of its own function's sites, got hot again at its
    /// original instruction (patch `id`, never entered: its entries lie on paths the guest does not take): the
    /// caller on the stack now is promoted one level up, as for ``watchUnservedCopies()``, and the patch's own
    /// function's sites are watched for further callers (the caller seen first may be one that cannot be entered).
    /// Returns whether the patch stays for that (once per patch, with call promotion on, when the stack shows a caller
    /// a promotion could serve); the next time it is found never entered, after the watch ended, it is undone as before.
    func promoteAboveUnentered(_ site: ExitSite, _ exit: VMExit, _ context: ExitContext, registersAtExit: Registers?,
                               patch id: Int) -> Bool {
        guard configuration.strategies.contains(.callPromotion),
              let first = state.withLock({ s -> AppliedPatch? in
                  guard let p = s.patches[id], let a = s.sites[site]?.report.instructionAddress,
                        p.copy?.function.contains(a) == true, s.promotedAbove.insert(id).inserted else { return nil }
                  return p
              }) else { return false }
        let total = detectors[context.vcpuID].counts(of: site)?.total ?? 0
        let found = tryPromoteOtherCaller(site, exit, context, registersAtExit: registersAtExit, first: first, firstID: id,
                                          total: total, failure: "caller of a copy never entered not promoted")
        // No caller a promotion could serve (a function called directly, a thread that never returns): undone as before.
        guard found != .noCaller else { return false }
        let watched = state.withLock { s -> [ExitSite] in
            guard let copy = s.patches[id]?.copy else { return [] }
            let own = first.sites.filter { x in
                s.callerWatch[x] == nil && s.sites[x]?.report.instructionAddress.map { copy.function.contains($0) } == true
            }
            for x in own {
                let mine = x == site
                s.callerWatch[x] = CallerWatch(checkAt: 0, misses: mine && found != .promoted ? 1 : 0, callers: mine && found == .promoted ? 1 : 0)
            }
            return own
        }
        rearmRequests.withLock { $0 += watched }
        rearmCount.add(1, ordering: .releasing)
        return true
    }
}

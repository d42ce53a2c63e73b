import VMMKit

// DMP step 7 for one site of a function copy (DESIGN.md): a site whose windows lost is turned off alone, its fast
// path revoked so that its enable word stays clear and its rewritten instruction runs the original access (an exit
// to the device), while the copy stays in place for its other sites; after an exponential back-off in the site's
// own exits the device is asked for the fast path again. Runs on the VM's timer thread (``verifyPatches()``).
extension DMPMiddleware {
    /// What verification decided for the sites of one patch whose windows lost (state lock held): turn them off
    /// alone, or undo the patch whole. `losing`: the sites that lost now, with their windows' reasons.
    ///
    /// The patch stays when it serves several sites and another one keeps it (``SiteRecord/keepsCopy(_:)``: on,
    /// served accesses, its last window did not lose); otherwise (an instruction stub, a copy whose other sites
    /// are off, lost too or serve nothing) it is undone whole, as before.
    func judgeLosingSites(_ losing: [(site: ExitSite, reason: String)], of p: AppliedPatch, _ s: State) -> SiteVerdict? {
        guard let first = losing.first else { return nil }
        let lost = Set(losing.map(\.site))
        let keepers = p.sites.filter { x in !lost.contains(x) && s.sites[x]?.keepsCopy(configuration) == true }
        if p.sites.count > 1, !keepers.isEmpty { return .turnOff(losing) }
        var why = "\(siteName(first.site, s)): \(first.reason)"
        if p.sites.count > 1 {
            let off = p.sites.filter { s.sites[$0]?.report.state == .disabled }.count
            why += "; no other site of the copy pays (\(p.sites.count - 1) others, \(off) of them off)"
        }
        return .undoPatch(DMPRefusal(.verify, why))
    }

    /// The sites of patch `p` turned off alone whose back-off is over (state lock held).
    func sitesToTurnOn(of p: AppliedPatch, _ s: State) -> [ExitSite] {
        p.sites.filter { x in
            guard let r = s.sites[x], r.report.state == .disabled, let at = r.reenableAtExits else { return false }
            return r.report.exitsWhilePatched >= at
        }
    }

    /// Turns `site`, one site of live patch `id`, off alone (see the file's note): the device's grant is revoked
    /// (the enable word cleared for good until a new grant), the site's window closed, its back-off set, the
    /// last ring producer's going told to the ring device.
    func turnOff(_ site: ExitSite, ofPatch id: Int, reason: String) {
        guard let vm else { return }
        let marked = state.withLock { s -> (word: FastPathEnableWord, grant: (space: BusSpace, address: UInt64), name: String)? in
            guard s.patches[id]?.sites.contains(site) == true, var r = s.sites[site], r.patchID == id, r.report.state == .patched,
                  let w = r.enableWord, let g = r.grant else { return nil }
            observeHits(&r, memory: vm.memory)
            r.undos += 1
            r.report.turnedOff += 1
            r.window = nil
            let exits = SiteRecord.backOff(base: configuration.initialBackoff, undos: r.undos)
            let never = r.undos >= configuration.maximumUndos
            r.reenableAtExits = never ? nil : SiteRecord.saturatingSum(r.report.exitsWhilePatched, exits)
            let copy = s.patches[id]?.copy.map { "the copy of \($0.function.symbol.name)" } ?? "the patch"
            r.report.state = .disabled
            r.report.refusal = DMPRefusal(.verify, "\(reason); its fast path turned off alone, \(copy) serves its other sites on; "
                + (never ? "never turned on again (undone \(r.undos) times)" : "turned on again after \(exits) more of its exits"))
            s.sites[site] = r
            return (w, g, siteName(site, s))
        }
        guard let marked else { return }
        vm.bus.revokeFastPath(space: marked.grant.space, address: marked.grant.address, enableWord: marked.word)
        detachRingProducersUnlessLive()
        logger.notice("site turned off", metadata: ["site": "\(marked.name)", "patch": "\(id)", "reason": "\(reason)"])
    }

    /// Asks the device again for the fast path of `site` (turned off alone in live patch `id`, its back-off over);
    /// on success the site serves again with a fresh window. A device that grants something else, or nothing,
    /// leaves the site off for good, with the reason.
    func turnOn(_ site: ExitSite, ofPatch id: Int) {
        guard let vm, let planner else { return }
        typealias Ask = (word: FastPathEnableWord, grant: (space: BusSpace, address: UInt64), slot: GuestAddress?,
                         granted: FastPathDescription, ring: Bool)
        let ask = state.withLock { s -> Ask? in
            guard s.patches[id]?.sites.contains(site) == true, let r = s.sites[site], r.patchID == id, r.report.state == .disabled,
                  let w = r.enableWord, let at = r.grant, let g = r.granted else { return nil }
            return (w, at, r.slot, g, r.ringProducer)
        }
        guard let ask else { return }
        let failure: DMPRefusal?
        do throws(DMPRefusal) {
            try planner.regrant(site, enableWord: ask.word, slot: ask.slot, granted: ask.granted)
            failure = nil
        } catch {
            failure = error
        }
        let live = state.withLock { s -> Bool in
            guard s.patches[id]?.sites.contains(site) == true, var r = s.sites[site], r.patchID == id,
                  r.report.state == .disabled else { return false }
            if let failure {
                r.reenableAtExits = nil
                r.report.refusal = DMPRefusal(failure.stage, "\((r.report.refusal?.reason).map { $0 + "; " } ?? "")"
                    + "its fast path could not be granted again (it stays off): \(failure.reason)")
            } else {
                observeHits(&r, memory: vm.memory)
                r.report.state = .patched
                r.report.refusal = nil
                r.reenableAtExits = nil
                r.window = VerifyWindow(at: r.costs)
                r.report.lastWindowCost = nil
            }
            s.sites[site] = r
            return true
        }
        if failure == nil && !live {
            // The patch went meanwhile (an undo revoked the site's grant before this one was made): take it back.
            vm.bus.revokeFastPath(space: ask.grant.space, address: ask.grant.address, enableWord: ask.word)
            return
        }
        if failure == nil && ask.ring, let rings { producers.withLock { _ in rings.producerAttached() } }
        logger.notice(failure == nil ? "site turned on again" : "site stays off",
                      metadata: ["site": "\(describe(site))", "patch": "\(id)", "reason": "\(failure?.description ?? "back-off over")"])
    }

    /// The site's location for reasons and log lines (its symbol, or its RIP).
    func siteName(_ site: ExitSite, _ s: State) -> String {
        guard let r = s.sites[site], !r.report.location.isEmpty else { return hex(site.rip) }
        return r.report.location
    }
}

/// What verification does with a patch some of whose sites lost (``DMPMiddleware/judgeLosingSites(_:of:_:)``).
enum SiteVerdict {
    /// Turn these sites off alone: the patch stays for its others.
    case turnOff([(site: ExitSite, reason: String)])
    /// Undo the patch whole, with this reason.
    case undoPatch(DMPRefusal)
}

import VMMKit

// Guards and undo: writes into guarded pages, the periodic task, taking patches out (one, failed ones again,
// all of them).
extension DMPMiddleware {
    // MARK: Guards

    /// A write into a guarded page: unpatch what depends on the page (the guest's bytes stand where it overwrote ours).
    public func guardedWrite(_ write: GuardedWrite, context: ExitContext?) {
        guard context != nil else {
            // A host write, possibly from a device holding its lock: act later. Once per span of pages until then
            // (undo works by page): a device the guest points at a guarded page (a DMA queue) writes there on every
            // request, and the list would grow with each until the next periodic pass.
            let pages = DMPMiddleware.pageSpan(write.range)
            state.withLock { s in
                if !s.hostWrites.contains(where: { DMPMiddleware.pageSpan($0) == pages }) { s.hostWrites.append(write.range) }
            }
            return
        }
        invalidate(pagesOf: write.range, reason: "the guest wrote into a guarded page at \(write.range.start)")
    }

    /// An instruction KVM could not emulate at a guarded page: unpatch what depends on it and run it again.
    public func guardedEmulationFailure(_ failure: GuardedEmulationFailure, context: ExitContext) -> GuardDecision {
        guard let writes = failure.writes, !writes.isEmpty else { return .fail }
        for w in writes { invalidate(pagesOf: w, reason: "an emulation failure wrote into a guarded page at \(w.start)") }
        _ = patcher.retryStrandedPages()
        let stillGuarded = Set(patcher.guardedPages + patcher.strandedPages)
        let cleared = writes.allSatisfy { !stillGuarded.contains($0.start.rawValue & ~0xfff) }
        return cleared ? .retry : .fail
    }

    /// Undoes every patch that guards a page of `range`. A site whose patch served at least a verification
    /// window's accesses (``DMPConfiguration/verifyWindowAccesses``, counted by a trusted hit counter) before the
    /// write paid: the write is the guest changing code (its own, or code sharing the page: alternatives, static
    /// keys), no sign against the patch, so that undo is not counted and the site is patched again as soon as it is
    /// hot again. Any other site backs off as after every undo (a page the guest keeps writing is not re-patched
    /// on every write).
    private func invalidate(pagesOf range: GuestRange, reason: String) {
        let (first, last) = DMPMiddleware.pageSpan(range)
        let ids: [Int] = state.withLock { s in
            s.patches.filter { _, p in p.guardedPages.contains { $0 >= first && $0 <= last } }.map(\.key).sorted()
        }
        for id in ids {
            // A site turned off alone (it did not pay) keeps its undo and back-off.
            let sites = state.withLock { s in (s.patches[id]?.sites ?? []).filter { s.sites[$0]?.report.state != .disabled } }
            guard undo(id, reason: DMPRefusal(.verify, reason), backOff: true, backOffBase: configuration.threshold) else { continue }
            state.withLock { s in
                for site in sites {
                    guard var r = s.sites[site], r.report.state == .undone, r.undos > 0, let h = r.hits, h.trusted,
                          h.counted >= UInt64(max(1, configuration.verifyWindowAccesses)) else { continue }
                    r.undos -= 1
                    r.retryAtExits = 0
                    s.sites[site] = r
                }
            }
        }
    }

    /// The first and last page (4 KiB) `range` touches; an empty range touches its start's page.
    static func pageSpan(_ range: GuestRange) -> (first: UInt64, last: UInt64) {
        (range.start.rawValue & ~0xfff, (range.start.rawValue &+ max(range.size, 1) &- 1) & ~0xfff)
    }

    // MARK: Verify and undo

    /// Runs on the VM's timer thread: acts on host writes into guarded pages and verifies patches.
    func periodic() {
        let writes = state.withLock { s -> [GuestRange] in
            defer { s.hostWrites = [] }
            return s.hostWrites
        }
        for w in writes { invalidate(pagesOf: w, reason: "a host-side write into a guarded page at \(w.start)") }
        retryFailedUndos()
        recheckMappings()
        guard configuration.verify else { return }
        verifyPatches()
    }

    /// Takes patch `id` out and records why; with `backOff` the site waits before it may be patched again.
    /// Returns whether the patch is out. When the unpatch fails (an ioctl failed: the vCPUs' registers could not
    /// be read), the patch stays whole and serving, the failure is logged and reported, and the undo is tried again.
    @discardableResult
    func undo(_ id: Int, reason: DMPRefusal, backOff: Bool, backOffBase: Int? = nil) -> Bool {
        guard let vm else { return false }
        guard let (p, checks) = state.withLock({ s -> (AppliedPatch, (entry: Bool, judged: Bool))? in
            if s.rebuilding.contains(id) {
                // Its copy is being rebuilt: undo the patch that results, once it is in place.
                s.deferredUndos[id] = (reason, backOff, backOffBase)
                return nil
            }
            guard let p = s.patches.removeValue(forKey: id) else { return nil }
            s.failedUndos[id] = nil
            s.trials[id] = nil
            let checks = (entry: s.entryChecks.remove(id) != nil, judged: s.judged.remove(id) != nil)
            refreshPatchedSites(s)
            return (p, checks)
        }) else { return false }
        do {
            // The copy is evicted too: a thread returning into it, or going round one of its loops, leaves it at
            // its next pad for the original (where the guest's bytes are back).
            try patcher.revert(p.writes, unguarding: p.guardedPages, evicting: p.evictionWrites())
        } catch {
            // Nothing was changed: the patch is back, whole, and the undo waits for the next try.
            let why = "\(error)"
            state.withLock { s in
                s.patches[id] = p
                if checks.entry { s.entryChecks.insert(id) }
                if checks.judged { s.judged.insert(id) }
                s.failedUndos[id] = (reason, backOff, backOffBase)
                for site in p.sites { s.sites[site]?.report.undoFailure = why }
                refreshPatchedSites(s)
            }
            logger.error("undo failed", metadata: ["patch": "\(p.strategy)", "reason": "\(reason)", "error": "\(why)",
                                                   "outcome": "the patch stays in place whole; the undo is tried again"])
            return false
        }
        logStranded()
        state.withLock { s in
            for site in p.sites {
                guard var r = s.sites[site] else { continue }
                r.report.undoFailure = nil
                if let w = r.enableWord, let g = r.grant {
                    w.store(false)
                    vm.bus.revokeFastPath(space: g.space, address: g.address, enableWord: w)
                }
                observeHits(&r, memory: vm.memory)
                // A site turned off alone counted its undo then: the copy's undo is not another, and the site waits
                // out what is left of that back-off (nil: it was never to be turned on again).
                let wasOff = r.report.state == .disabled
                let leftWhileOff = r.reenableAtExits.map { max(1, $0 - r.report.exitsWhilePatched) }
                r.patchID = nil
                r.window = nil
                r.reenableAtExits = nil
                r.report.state = .undone
                r.report.refusal = reason
                if backOff && wasOff {
                    r.retryAtExits = leftWhileOff.map { -$0 }
                } else if backOff {
                    r.undos += 1
                    // In exits of the site counted by a vCPU's detector from now: its total then is unknown
                    // here (detectors belong to their vCPUs), so the first candidate after re-arming sets it.
                    let base = backOffBase ?? configuration.initialBackoff
                    r.retryAtExits = r.undos >= configuration.maximumUndos ? nil : -SiteRecord.backOff(base: base, undos: r.undos)
                } else {
                    r.retryAtExits = nil
                }
                s.sites[site] = r
            }
        }
        if state.withLock({ s in p.sites.contains { s.sites[$0]?.ringProducer == true } }) { detachRingProducersUnlessLive() }
        if backOff {
            rearmRequests.withLock { $0 += p.sites }
            rearmCount.add(1, ordering: .releasing)
        }
        logger.notice("undone", metadata: ["patch": "\(p.strategy)", "reason": "\(reason)"])
        return true
    }

    /// Tells the ring device its producers are gone when no live patch appends to a ring (the last ring patch
    /// undone, its last ring site turned off alone, a plan that announced one and left none live, or the last
    /// ring patch switched off for an A/B trial phase): from then on the guest's own writes to the target registers
    /// are no producer fallbacks and do not keep the poller awake.
    func detachRingProducersUnlessLive() {
        guard let rings else { return }
        producers.withLock { _ in
            let live = state.withLock { s in s.patches.contains { id, q in appendsToRing(id, q, s) } }
            if !live { rings.producersDetached() }
        }
    }

    /// Whether patch `id` (`q`) appends to a ring now (state lock held): a ring site of it is on, and its bytes are
    /// in place — not the guest's original bytes of an A/B trial's *off* phase (``RateTrial/originalBytesInPlace``),
    /// which must leave what undoing the patch leaves, the poller asleep included, or the trial would compare two
    /// arms that both pay for a polling thread (on a loaded host, its CPU taken from the vCPU) and keep a patch
    /// that makes the guest slower than no DMP.
    func appendsToRing(_ id: Int, _ q: AppliedPatch, _ s: State) -> Bool {
        guard !(s.trials[id]?.originalBytesInPlace ?? false) else { return false }
        return q.sites.contains { s.sites[$0].map { $0.ringProducer && $0.report.state != .disabled } ?? false }
    }

    /// Tries again the undos that failed, and lifting guards no patch relies on that could not be lifted.
    private func retryFailedUndos() {
        let failed = state.withLock { $0.failedUndos.sorted { $0.key < $1.key } }
        for (id, u) in failed { undo(id, reason: u.reason, backOff: u.backOff, backOffBase: u.backOffBase) }
        let stranded = patcher.strandedPages
        guard !stranded.isEmpty else { return }
        if patcher.retryStrandedPages() == nil {
            logger.info("stranded guards lifted", metadata: ["pages": "\(stranded.map(hex))"])
        }
    }

    /// Logs pages the last patch or unpatch could not unguard (no patch relies on them; lifting is retried).
    func logStranded() {
        guard let note = patcher.takeStrandedNote() else { return }
        logger.warning("guard left stranded", metadata: ["error": "\(note)", "pages": "\(patcher.strandedPages.map(hex))"])
    }

    /// Takes every patch out, restoring each original byte that is still ours, and lifts every guard DMP placed.
    /// Returns how many patches were undone; a patch whose unpatch failed (an ioctl failed) stays in place whole,
    /// is logged and reported (``PatchSite/undoFailure``), and is tried again by the next call or the periodic task.
    @discardableResult
    public func unpatchAll() -> Int {
        let ids = state.withLock { $0.patches.keys.sorted() }
        var undone = 0
        for id in ids where undo(id, reason: DMPRefusal(.verify, "unpatchAll"), backOff: false) { undone += 1 }
        let stranded = patcher.strandedPages
        if !stranded.isEmpty {
            if let why = patcher.retryStrandedPages() {
                logger.error("guard left stranded", metadata: ["error": "\(why)", "pages": "\(stranded.map(hex))"])
            } else {
                logger.info("stranded guards lifted", metadata: ["pages": "\(stranded.map(hex))"])
            }
        }
        return undone
    }
}

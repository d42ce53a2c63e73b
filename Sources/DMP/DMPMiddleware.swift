import Logging
import Synchronization
import VMMKit

/// Dynamic Memory Paravirtualization as exit-chain middleware: it watches
/// exits, finds the guest instructions that cause most of them and patches
/// them into implanted fast paths served from shared memory
/// (DESIGN.md, "The DMP pipeline").
///
/// Install it with ``install(on:rings:configuration:logger:)`` after the
/// devices and before the guest runs; read ``report()`` at any time and call
/// ``unpatchAll()`` to take every patch out.
public final class DMPMiddleware: ExitHandler, PageGuardListener, @unchecked Sendable {
    /// The configuration it was created with.
    public let configuration: DMPConfiguration
    /// Where DMP tells its decisions (hot, patched, refused and why, undone and why).
    public let logger: Logger

    weak var vm: VirtualMachine?
    let rings: PVRingDevice?
    let detectors: [HotspotDetector]
    private let clocks: [WindowClock]
    /// One vCPU's exit-path objects, unretained: ``clocks``, ``detectors`` and ``implant`` keep them alive.
    private struct Lane {
        let clock: Unmanaged<WindowClock>
        let detector: Unmanaged<HotspotDetector>
    }
    /// Per vCPU, its ``Lane``: the exit path reaches its state without reference counting.
    private let lanes: UnsafeMutableBufferPointer<Lane>
    /// ``implant`` without reference counting, for the exit path.
    private let implantOnExitPath: Unmanaged<Implant>?
    let patcher: Patcher
    /// The patcher, for tests that change guest memory at the moment of writing (``Patcher/beforeWriteChecks``).
    package var patcherForTesting: Patcher { patcher }
    /// The implant's code pages claimed so far (nil without an implant), for tests.
    package var implantCodePagesForTesting: GuestRange? { implant?.codePages }
    let implant: Implant?
    let locator: SiteLocator?
    let planner: PatchPlanner?
    /// Why DMP cannot patch at all (no disassembler, a bad implant area), if so.
    private let disabledReason: DMPRefusal?
    /// Sites, patches and pending host writes (never held across a pause).
    let state = Mutex(State())
    /// Held while one vCPU plans and writes a patch; others skip planning meanwhile (taken with try-lock only: a vCPU
    /// blocked in its handler would never let the patching vCPU pause it).
    let planning = Mutex(())
    /// Orders telling the ring device about DMP's producers (a patch going live with a ring fast path, the
    /// last one going): taken before the state lock, never while holding it.
    private let producers = Mutex(())
    /// Sites undone since DMP started, in order: each vCPU re-arms them in its own detector (``rearmCount`` tells it to look).
    let rearmRequests = Mutex<[ExitSite]>([])
    let rearmCount = Atomic<Int>(0)
    let latencies = Mutex<[PatchLatency]>([])
    /// Two bits per patched site's exit RIP (``filterBits(_:)``): an exit missing one of its bits is at no patched site.
    private let patchedSites = Atomic<UInt64>(0)

    /// Nanoseconds from a site becoming hot to every vCPU resuming with its patch in place, for every patch
    /// applied so far (re-patches after an undo included), in order. A site that became hot while another
    /// vCPU was patching counts from that first moment (``PatchLatency/deferredNanoseconds``).
    public var hotToPatchedNanoseconds: [UInt64] { latencies.withLock { $0.map(\.hotToPatchedNanoseconds) } }

    /// How each patch applied so far spent its time from hot to patched, in order.
    public var patchLatencies: [PatchLatency] { latencies.withLock { $0 } }

    package struct State: Sendable {
        var sites: [ExitSite: SiteRecord] = [:]
        var order: [ExitSite] = []
        var patches: [Int: AppliedPatch] = [:]
        var nextPatchID = 1
        /// Guarded pages written by host-side writes (devices, loaders), acted on by the periodic task.
        var hostWrites: [GuestRange] = []
        /// Patches whose function copy is being rebuilt (their undo waits in ``deferredUndos`` until it is done).
        var rebuilding: Set<Int> = []
        var deferredUndos: [Int: (reason: DMPRefusal, backOff: Bool, backOffBase: Int?)] = [:]
        /// Patches that had served nothing at their first verification: their sites were re-armed in every
        /// detector, so that the original instruction becoming hot again shows the patch is never entered.
        var entryChecks: Set<Int> = []
        /// Patches past their one-time check (entered at all; for CPL0 code, an A/B trial, ``RateTrial``): a site
        /// the guest stops using later is not undone for the accesses per second falling.
        /// Their costs per access keep being judged in windows (``VerifyWindow``).
        var judged: Set<Int> = []
        /// A/B trials of CPL0 patches in progress (``RateTrial``), by patch.
        var trials: [Int: RateTrial] = [:]
        /// Patches merged into another by a call promotion: an undo that waited for the merge goes to that one.
        var mergedInto: [Int: Int] = [:]
        /// When sites put off because another vCPU was patching first became hot.
        var deferredSince: [ExitSite: ContinuousClock.Instant] = [:]
        /// Undos that failed (an ioctl failed while unpatching; the patch stays whole), tried again by the periodic task.
        var failedUndos: [Int: (reason: DMPRefusal, backOff: Bool, backOffBase: Int?)] = [:]
        /// Sites of accessors served through a promoted call, watched for other callers (``CallerWatch``).
        var callerWatch: [ExitSite: CallerWatch] = [:]
    }

    /// Creates the middleware for `vm`; ``install(on:rings:configuration:logger:)`` also adds it to the VM.
    /// - Parameters:
    ///   - vm: the VM whose exits it sees.
    ///   - rings: the paravirtual ring device whose rings ring-append fast paths use (nil: no such fast paths).
    ///   - configuration: thresholds, strategies, verification, dry run.
    ///   - logger: where decisions are logged; the VMM's own logger, so they appear in its logs.
    public init(vm: VirtualMachine, rings: PVRingDevice?, configuration: DMPConfiguration = DMPConfiguration(),
                logger: Logger = Logger(label: "vmmkit.dmp")) {
        self.vm = vm
        self.rings = rings
        self.configuration = configuration
        self.logger = logger
        self.detectors = vm.vcpus.map { _ in HotspotDetector(configuration) }
        self.clocks = detectors.map { WindowClock(detector: $0) }
        lanes = .allocate(capacity: clocks.count)
        _ = lanes.initialize(from: clocks.map { Lane(clock: .passUnretained($0), detector: .passUnretained($0.detector)) })
        let patcher = Patcher(vm: vm)
        self.patcher = patcher
        var implant: Implant?, locator: SiteLocator?, planner: PatchPlanner?, why: DMPRefusal?
        do throws(DMPRefusal) {
            let i = try Implant(area: configuration.implantArea)
            implant = i
            locator = try SiteLocator(symbols: configuration.symbols)
            planner = try PatchPlanner(vm: vm, rings: rings, configuration: configuration, implant: i, patcher: patcher)
        } catch {
            why = error
            logger.error("DMP cannot patch", metadata: ["reason": "\(error)"])
        }
        self.implant = implant
        self.implantOnExitPath = implant.map { .passUnretained($0) }
        self.locator = locator
        self.planner = planner
        self.disabledReason = why
    }

    deinit { lanes.deallocate() }

    /// Creates the middleware, adds it to `vm`'s exit chain, makes it the VM's
    /// page-guard listener and starts its periodic verification. Call before the VM runs.
    @discardableResult
    public static func install(on vm: VirtualMachine, rings: PVRingDevice?,
                               configuration: DMPConfiguration = DMPConfiguration(),
                               logger: Logger = Logger(label: "vmmkit.dmp")) -> DMPMiddleware {
        let dmp = DMPMiddleware(vm: vm, rings: rings, configuration: configuration, logger: logger)
        vm.addExitHandler(dmp)
        vm.setPageGuardListener(dmp)
        vm.addPeriodicTask(every: 20_000_000) { [weak dmp] _ throws(VMError) in
            dmp?.periodic()
            return nil
        }
        return dmp
    }

    // MARK: The exit path

    /// DMP counts port I/O and MMIO exits only.
    public var exitKinds: Set<ExitKind>? { [.io, .mmio] }

    /// Counts the exit; a site that just became hot is located and, if it qualifies, patched.
    ///
    /// An exit that is not a candidate costs a RIP read from the sync registers, one detector update
    /// and a few loads: no lock, no reference counting, no allocation (`minivmm exit-path --compare-dmp`).
    public func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
        var site: ExitSite
        switch exit {
        case .io(let io): site = ExitSite(rip: 0, kind: .io, address: UInt64(io.port), size: io.size, direction: io.direction)
        case .mmio(let m): site = ExitSite(rip: 0, kind: .mmio, address: m.address.rawValue, size: m.size, direction: m.direction)
        default: return .pass
        }
        let id = context.vcpuID
        guard id >= 0, id < lanes.count, let rip = context.instructionPointerAtExitIfAvailable() else { return .pass }
        site.rip = rip
        // The vCPU's clock and detector, borrowed: nothing is retained or released per exit.
        let lane = lanes[id]
        let rearmed = lane.clock._withUnsafeGuaranteedRef { clock in
            clock.tick()
            return clock.rearmed
        }
        if rearmCount.load(ordering: .relaxed) != rearmed { applyRearms(id) }
        // The patch whose implant mapping is walked again once the exit is handled (page-table writes do not exit).
        var recheck: Int?
        if let implant = implantOnExitPath,
           let owner = implant._withUnsafeGuaranteedRef({ $0.owner(ofInstructionPointer: rip) }) {
            // An exit from implanted code: a fallback is charged to its site; an instruction of a
            // function copy that no fast path serves counts as the original instruction.
            recheck = owner
            guard let original = chargeImplantExit(owner: owner, rip: rip, site: site) else {
                return try forwardThenRecheck(exit, context, patch: owner)
            }
            site = original
        } else if case let bits = DMPMiddleware.filterBits(rip), patchedSites.load(ordering: .relaxed) & bits == bits {
            // Possibly an exit at a patched site's own instruction (reached some way the patch does not cover).
            recheck = patchServing(site)
        }
        let hot = lane.detector._withUnsafeGuaranteedRef { $0.record(site) }
        guard hot else {
            guard let recheck else { return .pass }
            return try forwardThenRecheck(exit, context, patch: recheck)
        }
        return try candidate(site, exit, context)
    }

    /// A site passed the threshold: let the chain handle the exit, then locate, plan and patch.
    @inline(never)
    private func candidate(_ site: ExitSite, _ exit: VMExit, _ context: ExitContext) throws(VMError) -> ExitResult {
        let registersAtExit = try? context.registers()
        let result = try context.forward(exit)
        guard result == .handled else { return result }
        // Any site becoming hot walks every live patch's implant mapping again.
        recheckMappings()
        let known = state.withLock { s -> (undone: Bool, retryAt: Int?)? in
            guard let r = s.sites[site] else { return nil }
            return (r.report.state == .undone, r.retryAtExits)
        }
        if let id = notEntered(site) {
            // The original instruction exited `threshold` times again after the patch, which served nothing.
            let n = detectors[context.vcpuID].counts(of: site)?.inWindow ?? 0
            undo(id, reason: DMPRefusal(.verify, "never entered: the original instruction still exits (\(n) of the last \(configuration.window) exits) and no access was served in the guest"), backOff: true)
            return result
        }
        if let known {
            // Refused and patched sites stay as they are (an accessor's site served through a promoted call
            // looks for another caller); an undone one waits out its back-off.
            guard known.undone, var retryAt = known.retryAt else {
                if !known.undone { otherCaller(site, exit, context, registersAtExit: registersAtExit) }
                return result
            }
            let total = detectors[context.vcpuID].counts(of: site)?.total ?? 0
            if retryAt < 0 {
                // The back-off starts now, in this vCPU's count of the site.
                retryAt = total - retryAt
                state.withLock { $0.sites[site]?.retryAtExits = retryAt }
            }
            if total < retryAt {
                _ = detectors[context.vcpuID].rearm(site)
                return result
            }
        }
        let now = ContinuousClock.now
        let hotAt = state.withLock { $0.deferredSince.removeValue(forKey: site) } ?? now
        let window = detectors[context.vcpuID].counts(of: site)
        let seconds = clocks[context.vcpuID].secondsForLast(configuration.window)
        state.withLock { s in
            var record = s.sites[site] ?? SiteRecord(report: PatchSite(site: site, location: symbolize(site.rip)))
            if s.sites[site] == nil { s.order.append(site) }
            record.report.exitsBefore = window?.total ?? 0
            record.report.state = .candidate
            record.hotAt = hotAt
            // The site's share of the exits of that span, over the span's time.
            if let w = window, let span = seconds, span.seconds > 0, span.exits > 0 {
                let share = Double(w.inWindow) / Double(min(configuration.window, max(span.exits, w.inWindow)))
                record.baselineRate = share * Double(span.exits) / span.seconds
            }
            s.sites[site] = record
        }
        logger.info("hot", metadata: ["site": "\(describe(site))", "exits": "\(window?.total ?? 0)"])
        let planned: Bool? = planning.withLockIfAvailable { _ in
            do throws(DMPRefusal) {
                try plan(site, exit, context, registersAtExit: registersAtExit, hotAt: hotAt, deferred: now - hotAt)
            } catch {
                refuse(site, error)
            }
            return true
        }
        logStranded()
        if planned == nil {
            // Another vCPU is patching: forget the site for now and let it become hot again (its
            // hot-to-patched time still counts from now).
            state.withLock {
                $0.deferredSince[site] = hotAt
                if $0.sites[site]?.undos == 0 {
                    $0.sites[site] = nil
                    $0.order.removeAll { $0 == site }
                } else {
                    $0.sites[site]?.report.state = .undone
                }
            }
            _ = detectors[context.vcpuID].rearm(site)
        }
        return result
    }

    /// The patch serving `site` when it is under an entry check (it served nothing at its first verification) and
    /// still has served nothing: the site became hot again at its original instruction, so nothing enters the patch.
    private func notEntered(_ site: ExitSite) -> Int? {
        guard let vm else { return nil }
        return state.withLock { s -> Int? in
            // A site served through a promoted call exits at its original instruction from callers not promoted yet:
            // that is another caller (``otherCaller(_:_:_:registersAtExit:)``), not a copy nothing enters.
            guard let r = s.sites[site], r.report.state == .patched, let id = r.patchID, s.entryChecks.contains(id),
                  s.callerWatch[site] == nil, let p = s.patches[id] else { return nil }
            var served: UInt64 = 0
            for x in p.sites {
                guard var r = s.sites[x] else { continue }
                served &+= observeHits(&r, memory: vm.memory)
                s.sites[x] = r
            }
            return served == 0 ? id : nil
        }
    }

    /// The patch serving `site`, if any (counting the exit at its original instruction).
    @inline(never)
    private func patchServing(_ site: ExitSite) -> Int? {
        state.withLock { s in
            guard let id = s.sites[site]?.patchID else { return nil }
            s.sites[site]?.exitsAtOriginal += 1
            return id
        }
    }

    /// Lets the chain handle the exit, then walks patch `id`'s implant mapping again.
    @inline(never)
    private func forwardThenRecheck(_ exit: VMExit, _ context: ExitContext, patch id: Int) throws(VMError) -> ExitResult {
        let result = try context.forward(exit)
        recheckMapping(ofPatch: id)
        return result
    }

    /// The two bits of ``patchedSites`` for an exit RIP (a one-word Bloom filter: with a handful of patched
    /// sites, an exit at another RIP finds both bits set a few times in a hundred).
    @inline(__always)
    static func filterBits(_ rip: UInt64) -> UInt64 {
        (1 << ((rip ^ (rip >> 6) ^ (rip >> 12)) & 63)) | (1 << (((rip >> 3) ^ (rip >> 9) ^ (rip >> 17)) & 63))
    }

    /// Sets ``patchedSites`` to the bits of the sites of the patches in place (under the state lock).
    func refreshPatchedSites(_ s: State) {
        var bits: UInt64 = 0
        for p in s.patches.values { for site in p.sites { bits |= DMPMiddleware.filterBits(site.rip) } }
        patchedSites.store(bits, ordering: .relaxed)
    }

    // MARK: The implant's mapping

    /// Walks patch `id`'s implant mapping again (``ImplantMapping``); undoes the patch, with the reason, if the
    /// guest's page tables no longer map it as when it was patched.
    private func recheckMapping(ofPatch id: Int) {
        guard let vm, let mapping = state.withLock({ $0.patches[id]?.mapping }) else { return }
        guard let why = mapping.problem(in: vm.memory) else { return }
        undo(id, reason: DMPMiddleware.unmapped(why), backOff: true)
    }

    /// Walks every live patch's implant mapping again; undoes those that no longer hold.
    private func recheckMappings() {
        let ids = state.withLock { $0.patches.keys.sorted() }
        for id in ids { recheckMapping(ofPatch: id) }
    }

    /// The undo reason for a mapping that no longer holds.
    private static func unmapped(_ why: String) -> DMPRefusal {
        DMPRefusal(.implant, "the guest's page tables no longer map the implant as when it was patched: \(why)")
    }

    /// Charges an exit taken from implanted code: returns nil when it was a fallback of a site the patch
    /// serves (counted there), or the site as the original instruction would have caused it.
    @inline(never)
    private func chargeImplantExit(owner: Int, rip: UInt64, site: ExitSite) -> ExitSite? {
        state.withLock { s -> ExitSite? in
            guard let p = s.patches[owner] else { return nil }
            // A body's kick of the ring poller is an exit the patch causes, not another access.
            let kick = site.kind == .io && site.direction == .write && planner?.kickPort.map { UInt64($0) == site.address } == true
            guard let copy = p.copy else {
                // A stub: every exit from it is its site's fallback or kick.
                if let served = p.sites.first { DMPMiddleware.charge(&s.sites[served], kick: kick) }
                return nil
            }
            guard let original = (p.copy(holding: rip) ?? copy).originalAddress(of: rip) else { return nil }
            // A fallback of a served access, or a body's kick; another access of the same instruction (an
            // out-of-line `outb` called for a port no route serves) counts as the original instruction's,
            // a site of its own.
            if let served = p.sites.first(where: { ($0.kind == site.kind && $0.address == site.address && $0.size == site.size
                                                    && $0.direction == site.direction || kick)
                                                   && s.sites[$0]?.report.instructionAddress == original }) {
                DMPMiddleware.charge(&s.sites[served], kick: kick)
                return nil
            }
            return ExitSite(rip: original, kind: site.kind, address: site.address, size: site.size, direction: site.direction)
        }
    }

    /// Counts an exit from implanted code against its site: a fallback, or a kick (both are exits the patch did not save).
    private static func charge(_ record: inout SiteRecord?, kick: Bool) {
        record?.report.exitsWhilePatched += 1
        if kick { record?.report.kicksWhilePatched += 1 }
    }

    /// Locates the instruction of `site`, asks the device, chooses a shape, encodes it and patches it in.
    private func plan(_ site: ExitSite, _ exit: VMExit, _ context: ExitContext, registersAtExit: Registers?,
                      hotAt: ContinuousClock.Instant, deferred: Duration) throws(DMPRefusal) {
        guard let locator, let planner, let implant else {
            throw disabledReason ?? DMPRefusal(.plan, "DMP could not start")
        }
        let located = try locator.locate(exit, context: context) { end in self.implantedInstruction(endingAt: end) }
        state.withLock {
            $0.sites[site]?.report.instructionAddress = located.virtualAddress
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
            .filter { e in state.withLock { $0.sites[e.site] == nil || $0.sites[e.site]?.report.state == .undone } }
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
                r.report.instructionAddress = sp.virtualAddress
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

    /// Re-arms, in vCPU `id`'s detector, the sites undone since it last looked (on its own thread).
    @inline(never)
    private func applyRearms(_ id: Int) {
        let seen = clocks[id].rearmed
        let (sites, count) = rearmRequests.withLock { ($0, rearmCount.load(ordering: .acquiring)) }
        for site in sites { _ = detectors[id].rearm(site) }
        clocks[id].rearmed = count
        _ = seen
    }

    /// Records and logs a refusal.
    func refuse(_ site: ExitSite, _ refusal: DMPRefusal) {
        state.withLock {
            $0.sites[site]?.report.state = .refused
            $0.sites[site]?.report.refusal = refusal
        }
        logger.notice("refused", metadata: ["site": "\(describe(site))", "reason": "\(refusal)"])
    }

    // MARK: Guards

    /// A write into a guarded page: unpatch what depends on the page (the guest's bytes stand where it overwrote ours).
    public func guardedWrite(_ write: GuardedWrite, context: ExitContext?) {
        guard context != nil else {
            // A host write, possibly from a device holding its lock: act later.
            state.withLock { $0.hostWrites.append(write.range) }
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

    /// Undoes every patch that guards a page of `range`.
    private func invalidate(pagesOf range: GuestRange, reason: String) {
        let first = range.start.rawValue & ~0xfff
        let last = (range.start.rawValue &+ max(range.size, 1) &- 1) & ~0xfff
        let ids: [Int] = state.withLock { s in
            s.patches.filter { _, p in p.guardedPages.contains { $0 >= first && $0 <= last } }.map(\.key).sorted()
        }
        for id in ids { undo(id, reason: DMPRefusal(.verify, reason), backOff: true, backOffBase: configuration.threshold) }
    }

    // MARK: Verify and undo

    /// Runs on the VM's timer thread: acts on host writes into guarded pages and verifies patches.
    private func periodic() {
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
                r.patchID = nil
                r.window = nil
                r.report.state = .undone
                r.report.refusal = reason
                if backOff {
                    r.undos += 1
                    // In exits of the site counted by a vCPU's detector from now: its total then is unknown
                    // here (detectors belong to their vCPUs), so the first candidate after re-arming sets it.
                    let base = backOffBase ?? configuration.initialBackoff
                    r.retryAtExits = r.undos >= configuration.maximumUndos ? nil : -(max(1, base) << min(r.undos - 1, 20))
                } else {
                    r.retryAtExits = nil
                }
                s.sites[site] = r
            }
        }
        if let rings, state.withLock({ s in p.sites.contains { s.sites[$0]?.ringProducer == true } }) {
            // The last ring producer gone: the guest's own writes to the target registers are no fallbacks.
            producers.withLock { _ in
                let live = state.withLock { s in
                    s.patches.values.contains { q in q.sites.contains { s.sites[$0]?.ringProducer == true } }
                }
                if !live { rings.producersDetached() }
            }
        }
        if backOff {
            rearmRequests.withLock { $0 += p.sites }
            rearmCount.add(1, ordering: .releasing)
        }
        logger.notice("undone", metadata: ["patch": "\(p.strategy)", "reason": "\(reason)"])
        return true
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

    /// The shared slots (guest-physical addresses) of the sites patched now, with their sites and enable words
    /// (tests that write into the slots or revoke the grants).
    package var sharedSlotsForTesting: [(site: ExitSite, slot: GuestAddress, enableWord: FastPathEnableWord)] {
        state.withLock { s in
            s.order.compactMap { site in
                guard let r = s.sites[site], r.patchID != nil, let slot = r.slot, let w = r.enableWord else { return nil }
                return (site, slot, w)
            }
        }
    }

    // MARK: Report

    /// Every site DMP has looked at, in the order they became hot, with current counts.
    public func report() -> [PatchSite] {
        let memory = vm?.memory
        return state.withLock { s in
            s.order.compactMap { site -> PatchSite? in
                guard var r = s.sites[site] else { return nil }
                if let memory, let id = r.patchID, s.patches[id] != nil {
                    observeHits(&r, memory: memory)
                    s.sites[site] = r
                }
                return r.report
            }
        }
    }

    /// `symbol+0x…` for a guest-virtual address, or the address.
    func symbolize(_ address: UInt64) -> String {
        configuration.symbols.symbolize(address) ?? hex(address)
    }

    /// A site for log lines.
    func describe(_ site: ExitSite) -> String {
        let dir = site.direction == .read ? "read" : "write"
        return "\(symbolize(site.rip)) \(site.kind) 0x\(String(site.address, radix: 16)) \(dir)\(site.size)"
    }
}

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
    let implant: Implant?
    let locator: SiteLocator?
    let planner: PatchPlanner?
    /// Why DMP cannot patch at all (a configuration outside its ranges, no disassembler, a bad implant area), if so.
    let disabledReason: DMPRefusal?
    /// The setting outside its allowed range when the configuration failed ``DMPConfiguration/validate()``: DMP is
    /// then off (it counts exits but patches nothing; every site that gets hot is refused with this reason). `nil`
    /// for a valid configuration.
    public let configurationError: DMPConfigurationError?
    /// Sites, patches and pending host writes (never held across a pause).
    let state = Mutex(State())
    /// Held while one vCPU plans and writes a patch; others skip planning meanwhile (taken with try-lock only: a vCPU
    /// blocked in its handler would never let the patching vCPU pause it).
    let planning = Mutex(())
    /// Orders telling the ring device about DMP's producers (a patch going live with a ring fast path, the
    /// last one going): taken before the state lock, never while holding it.
    let producers = Mutex(())
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
        /// Patches never entered whose callers were looked for one level up (once per patch: ``promoteAboveUnentered(_:_:_:registersAtExit:patch:)``).
        var promotedAbove: Set<Int> = []
    }

    /// Creates the middleware for `vm`; ``install(on:rings:configuration:logger:)`` also adds it to the VM.
    ///
    /// A configuration that fails ``DMPConfiguration/validate()`` turns DMP off, logged as an error and kept in
    /// ``configurationError``: call `validate()` first to report a bad setting to the VMM's user.
    /// - Parameters:
    ///   - vm: the VM whose exits it sees.
    ///   - rings: the paravirtual ring device whose rings ring-append fast paths use (nil: no such fast paths).
    ///   - configuration: thresholds, strategies, verification, dry run (each numeric setting within its range).
    ///   - logger: where decisions are logged; the VMM's own logger, so they appear in its logs. The default goes to
    ///     swift-log's global handler: without a `LoggingSystem.bootstrap` that prints every decision on stderr at
    ///     `.info` and above; pass a logger whose `logLevel` is `.warning` to keep a VMM's stderr quiet.
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
        var invalid: DMPConfigurationError?
        do throws(DMPRefusal) {
            do throws(DMPConfigurationError) { try configuration.validate() } catch {
                invalid = error
                throw DMPRefusal(.plan, "invalid configuration: \(error)")
            }
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
        self.configurationError = invalid
    }

    deinit { lanes.deallocate() }

    /// Creates the middleware, adds it to `vm`'s exit chain, makes it the VM's
    /// page-guard listener and starts its periodic verification. Call before the VM runs.
    /// `logger` as in ``init(vm:rings:configuration:logger:)`` (the default prints every decision on stderr).
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
            // The original instruction exited `threshold` times again after the patch, which served nothing: its
            // callers are promoted one level up where they can be, or it is undone.
            if promoteAboveUnentered(site, exit, context, registersAtExit: registersAtExit, patch: id) { return result }
            let n = detectors[context.vcpuID].counts(of: site)?.inWindow ?? 0
            undo(id, reason: DMPRefusal(.verify, "never entered: the original instruction still exits (\(n) of the last \(configuration.window) exits) and no access was served in the guest"), backOff: true)
            return result
        }
        if let known {
            // Refused and patched sites stay as they are (an accessor's site served through a promoted call
            // looks for another caller); an undone one waits out its back-off.
            guard known.undone, known.retryAt != nil else {
                if !known.undone { otherCaller(site, exit, context, registersAtExit: registersAtExit) }
                return result
            }
            // The back-off starts at the first look, in this vCPU's count of the site.
            let total = detectors[context.vcpuID].counts(of: site)?.total ?? 0
            if state.withLock({ $0.sites[site]?.backOffOver(atExits: total) }) == false {
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

    /// Re-arms, in vCPU `id`'s detector, the sites undone since it last looked (on its own thread).
    @inline(never)
    private func applyRearms(_ id: Int) {
        let seen = clocks[id].rearmed
        let (sites, count) = rearmRequests.withLock { ($0, rearmCount.load(ordering: .acquiring)) }
        for site in sites { _ = detectors[id].rearm(site) }
        clocks[id].rearmed = count
        _ = seen
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
                var row = r.report
                row.trialUnderWay = row.state == .patched && r.patchID.map { s.trials[$0] != nil } == true
                return row
            }
        }
    }

    /// `symbol+0x…` for a guest-virtual address, or the address.
    func symbolize(_ address: UInt64) -> String {
        configuration.symbols.symbolize(address) ?? hex(address)
    }

    /// A site for log lines: its row's location (the instruction's start once located) and its access. Takes the
    /// state lock: under it, use ``describe(_:)-(PatchSite)`` with the site's row.
    func describe(_ site: ExitSite) -> String {
        describe(state.withLock { $0.sites[site]?.report } ?? PatchSite(site: site, location: symbolize(site.rip)))
    }

    /// A site's row for log lines: `uart_putc+0x11 io 0x3f8 write1` (the instruction's start), or
    /// `uart_putc+0x12 (exit rip) io 0x3f8 write1` before the instruction is located.
    func describe(_ r: PatchSite) -> String {
        let dir = r.site.direction == .read ? "read" : "write"
        return "\(r.shownLocation) \(r.site.kind) 0x\(String(r.site.address, radix: 16)) \(dir)\(r.site.size)"
    }

    /// Records that `r`'s instruction starts at `address` and names its row by it (KVM leaves RIP past an `out` or
    /// an MMIO store, where the exit names the next instruction); an instruction inside a function copy is named by
    /// the original instruction it copies. A row named otherwise (an accessor served via a caller) keeps its name.
    /// Called under the state lock (`s`).
    func name(_ r: inout SiteRecord, instructionAt address: UInt64, _ s: State) {
        r.report.instructionAddress = address
        guard r.namedByInstruction || r.report.location == r.report.exitLocation else { return }
        let original = s.patches.values.lazy.compactMap { $0.copy(holding: address)?.originalAddress(of: address) }.first
        r.report.location = symbolize(original ?? address)
        r.namedByInstruction = true
    }
}

import VMMKit
import X86Disassembler

/// Turns a located hot instruction into a patch (DESIGN.md, DMP steps 3–6):
/// asks the device, chooses the shape, encodes it into the implant, checks the
/// guest's mappings and the guard rules, and writes it with the patcher.
///
/// Not thread-safe: the middleware calls it under its planning lock.
package final class PatchPlanner {
    /// Unowned, as in ``Patcher``: the VM holds DMP in its exit chain, so a strong reference made a
    /// cycle that leaked every VM DMP was installed on (LeakSanitizer).
    unowned let vm: VirtualMachine
    let rings: PVRingDevice?
    let configuration: DMPConfiguration
    let implant: Implant
    let patcher: Patcher
    let disassembler: X86Disassembler
    /// The cache-line size the implant's shared words are kept apart by.
    static let cacheLine = 64
    /// Where a read's shared slot lies in its data, after the enable word (8-byte aligned, same cache line).
    static let slotOffset: UInt64 = 8
    /// The number the next shared slot gets (``FastPathSlot/index``; the report names it).
    var nextSlotIndex = 0
    /// Dead padding already holding an entry's `jmp rel32` (never handed out twice).
    var usedPadding: [Range<UInt64>] = []
    /// The guest-virtual start of every function copy written, with the start of the function it copies (copies are
    /// never freed: a caller copied while one was entered through its call sites keeps calling it).
    var copyStarts: [UInt64: UInt64] = [:]
    /// Whether the CPU runs `lahf`/`sahf` in 64-bit mode (bodies save live flags with them, not `pushfq`).
    let lahf: Bool
    /// The port of the rings' kick register (``PVRingKick`` attached for `rings`), if any: ring
    /// appends kick a sleeping poller through it.
    let kickPort: UInt16?

    /// Creates a planner.
    package init(vm: VirtualMachine, rings: PVRingDevice?, configuration: DMPConfiguration,
                 implant: Implant, patcher: Patcher) throws(DMPRefusal) {
        self.vm = vm; self.rings = rings; self.configuration = configuration
        self.implant = implant; self.patcher = patcher
        let extended = (try? vm.backend.supportedCPUID())?.first { $0.function == 0x8000_0001 }
        lahf = extended.map { $0.ecx & 1 != 0 } ?? false
        kickPort = rings.flatMap { rings in
            vm.bus.attached.first { $0.space == .pio && ($0.device as? PVRingKick)?.rings === rings }
        }.map { UInt16(truncatingIfNeeded: $0.range.start.rawValue) }
        do { disassembler = try X86Disassembler() } catch {
            throw DMPRefusal(.plan, "cannot open the disassembler: \(error)")
        }
    }

    // MARK: Fast paths

    /// A granted fast path and the route the implanted code serves.
    package struct Grant: Sendable {
        /// What the implanted code serves (the body is emitted from it again when a copy is rebuilt).
        package var route: FastPathRoute
        /// The site, its enable word and hit counter.
        package var plan: SitePlan
    }

    /// Asks the device that owns `site`'s access for a fast path; builds the route.
    /// `memoryTarget` is the linear address the instruction accesses (MMIO).
    func grant(for site: ExitSite, instruction: X86Instruction, virtualAddress: UInt64, physicalAddress: GuestAddress,
               memoryTarget: UInt64?, cpl: Int, placement: ImplantPlacement, paging: PagingContext,
               kick: FastPathRoute.Target? = nil) throws(DMPRefusal) -> Grant {
        if cpl == 3 && !configuration.userModeFastPaths {
            throw DMPRefusal(.fastPath, "the code runs at CPL3 and user-mode fast paths are off (DMPConfiguration.userModeFastPaths)")
        }
        // An instruction no body can serve is refused for what it is, before the device is asked: an `or [m], r` on a
        // register exits twice (its read and its write), and the device declining the read says less than the shape.
        if case .failure(let why) = instruction.accessShape { throw DMPRefusal(.fastPath, "\(instruction): \(why)") }
        let space: BusSpace = site.kind == .io ? .pio : .mmio
        let size = Int(site.size)
        let ringIndex = rings?.targets.firstIndex { $0.space == space && $0.address == site.address && $0.width == size }
        // The enable word and the hit counter in cache lines of their own: the device reads the enable
        // word whenever it refreshes its grants (every ring batch, from the poller's CPU), and a hit
        // counter in that line would move it back and forth between that CPU and the vCPU's on every batch.
        // A read is offered a shared slot beside its enable word, in the same line: the device writes both when
        // the register changes, and the body reads both (one line to fetch).
        let data = try implant.allocateData(2 * PatchPlanner.cacheLine, alignment: PatchPlanner.cacheLine)
        let enableGPA = data.start
        let slotGPA = GuestAddress(data.start.rawValue + PatchPlanner.slotOffset)
        let hitsGPA = GuestAddress(data.start.rawValue + UInt64(PatchPlanner.cacheLine))
        let word: FastPathEnableWord
        var slot: FastPathSlot?
        let slotIndex = nextSlotIndex
        if configuration.dryRun {
            word = FastPathEnableWordStorage(count: 1)[0]
            if site.direction == .read { slot = FastPathSlotStorage(count: 1)[0] }
        } else {
            do { word = try FastPathEnableWord(memory: vm.memory, at: enableGPA) } catch {
                throw DMPRefusal(.implant, "cannot place an enable word at \(enableGPA): \(error)")
            }
            if site.direction == .read {
                do { slot = try FastPathSlot(memory: vm.memory, at: slotGPA, index: slotIndex) } catch {
                    throw DMPRefusal(.implant, "cannot place a shared slot at \(slotGPA): \(error)")
                }
            }
        }
        let granted: FastPathDescription
        do {
            granted = try vm.bus.grantFastPath(space: space, address: site.address, size: size, direction: site.direction,
                                               ring: ringIndex, slot: slot, enableWord: word).description
        } catch {
            throw DMPRefusal(.fastPath, "\(error)")
        }
        var slotRead = false
        if case .sharedSlotRead = granted.kind { slotRead = true; nextSlotIndex += 1 }
        var ring: RingMapping?
        var pendingRings: [RingMapping] = []
        do throws(DMPRefusal) {
            if case .ringAppend(let index, let mode) = granted.kind {
                if mode == .synchronous && kick == nil {
                    // A bounded wait that runs out must end in an exit that applies the entry: without a kick
                    // register the code may write, the access would complete before the device saw it.
                    throw DMPRefusal(.fastPath, "a synchronous ring append needs a kick register this code may write "
                                     + "(no ring kick port, or the guest's TSS I/O bitmap does not permit it at CPL3)")
                }
                ring = try mappedRing(index, synchronous: mode == .synchronous, cpl: cpl, placement: placement, paging: paging,
                                      kick: kick)
                // A synchronous append counts the iterations it waits, in the word after its hit counter.
                if mode == .synchronous { ring?.waitCounter = placement.virtualAddress(of: GuestAddress(hitsGPA.rawValue &+ 8)) }
                if !configuration.dryRun { rings?.producerAttached() }
            }
            // A read the device did not declare independent of its pending ring entries is served
            // only while the device's rings are empty (DESIGN.md step 3); the body checks them.
            if site.direction == .read && !granted.independentOfPendingRingEntries {
                for index in ringsOfDevice(at: site.address, space: space) {
                    pendingRings.append(try mappedRing(index, synchronous: false, cpl: cpl, placement: placement, paging: paging))
                }
            }
        } catch {
            vm.bus.revokeFastPath(space: space, address: site.address, enableWord: word)
            throw error
        }
        let target: FastPathRoute.Target
        if site.kind == .io {
            target = .port(UInt16(truncatingIfNeeded: site.address))
        } else {
            guard let m = memoryTarget else {
                vm.bus.revokeFastPath(space: space, address: site.address, enableWord: word)
                throw DMPRefusal(.fastPath, "the instruction's memory operand could not be evaluated")
            }
            target = .memory(m)
        }
        var route = FastPathRoute(target: target, width: size, direction: site.direction, kind: granted.kind,
                                  enableWord: placement.virtualAddress(of: enableGPA),
                                  hitCounter: placement.virtualAddress(of: hitsGPA), ring: ring,
                                  slot: slotRead ? placement.virtualAddress(of: slotGPA) : nil,
                                  pendingRings: pendingRings)
        route.lockedCounters = configuration.lockedCounters ?? (vm.vcpus.count > 1)
        if configuration.dryRun { vm.bus.revokeFastPath(space: space, address: site.address, enableWord: word) }
        var plan = SitePlan(site: site, virtualAddress: virtualAddress, physicalAddress: physicalAddress,
                            instruction: instruction.description, fastPath: PatchPlanner.describe(granted.kind),
                            userMode: cpl == 3, enableWord: configuration.dryRun ? nil : word,
                            grant: configuration.dryRun ? nil : (space, site.address), hitCounter: hitsGPA, data: data)
        if case .ringAppend(let index, _) = granted.kind { plan.ring = index }
        if slotRead && !configuration.dryRun { plan.slot = slotGPA }
        if let r = ring, r.waitCounter != nil {
            plan.waitCounter = (GuestAddress(hitsGPA.rawValue &+ 8), r.synchronousWaitLimit)
        }
        return Grant(route: route, plan: plan)
    }

    /// Ring `index` as implanted code sees it: at the placement's offset, mapped writable for `cpl`
    /// (checked by a walk), kicking through `kick` (``ringKick(for:)``).
    func mappedRing(_ index: Int, synchronous: Bool, cpl: Int, placement: ImplantPlacement,
                    paging: PagingContext, kick: FastPathRoute.Target? = nil) throws(DMPRefusal) -> RingMapping {
        guard let rings, index >= 0, index < rings.targets.count else {
            throw DMPRefusal(.fastPath, "the device named ring \(index), which does not exist")
        }
        let base = rings.base.rawValue + UInt64(index) * rings.stride
        let va = base &+ placement.offset
        let physical: GuestAddress
        do { physical = try vm.memory.translate(va, paging: paging, access: cpl == 3 ? [.write, .user] : [.write]).physical } catch {
            throw DMPRefusal(.implant, "ring \(index) is not mapped writable at \(hex(va)): \(error)")
        }
        guard physical.rawValue == base else {
            throw DMPRefusal(.implant, "ring \(index) is not mapped at \(hex(va)) (that address maps \(physical))")
        }
        return RingMapping(base: va, slotCount: rings.slotCount, synchronous: synchronous,
                           synchronousWaitLimit: UInt32(clamping: max(1, configuration.synchronousWaitLimit)), kick: kick)
    }

    /// The kick register bodies for `located` may write (a sleeping poller, a synchronous wait that ran
    /// out): the port of the ``PVRingKick`` attached for the rings, always at CPL0; at CPL3 only where the
    /// guest's TSS I/O bitmap permits it (KVM PVM checks the bitmap, not the user IOPL; an `out` the guest
    /// may not make would fault). Without one a body still falls back to the original access when it sees
    /// the poller asleep before publishing (that exit wakes it).
    func ringKick(for located: LocatedInstruction) -> FastPathRoute.Target? {
        guard let port = kickPort else { return nil }
        if located.cpl == 0 { return .port(port) }
        return ioBitmapPermits(port, tr: located.specialRegisters.tr, paging: located.paging) ? .port(port) : nil
    }

    /// Whether the 64-bit TSS at `tr` lets CPL3 write one byte to `port`: the I/O map base at offset 102,
    /// the port's bit clear, and both bytes the CPU reads within the limit.
    func ioBitmapPermits(_ port: UInt16, tr: Segment, paging: PagingContext) -> Bool {
        func byte(_ offset: UInt64) -> UInt8? {
            guard let t = try? vm.memory.translate(tr.base &+ offset, paging: paging) else { return nil }
            return try? vm.memory.read(UInt8.self, at: t.physical)
        }
        guard tr.present, tr.limit >= 103, let lo = byte(102), let hi = byte(103) else { return false }
        let at = (UInt64(lo) | UInt64(hi) << 8) + UInt64(port / 8)
        guard at + 1 <= UInt64(tr.limit), let bits = byte(at) else { return false }
        return bits & (1 << (port % 8)) == 0
    }

    /// The indices of the rings whose entries go to the device that owns `address`.
    func ringsOfDevice(at address: UInt64, space: BusSpace) -> [Int] {
        guard let rings, let owner = vm.bus.device(at: address, space: space) else { return [] }
        return rings.targets.indices.filter { i in
            let t = rings.targets[i]
            return t.space == space && vm.bus.device(at: t.address, space: t.space)?.range == owner.range
        }
    }

    /// Asks the device whether it would grant `site` a fast path (with a host-side enable word, revoked at once).
    package func probeFastPath(_ site: ExitSite) throws(DMPRefusal) {
        let space: BusSpace = site.kind == .io ? .pio : .mmio
        let ring = rings?.targets.firstIndex { $0.space == space && $0.address == site.address && $0.width == Int(site.size) }
        let word = FastPathEnableWordStorage(count: 1)[0]
        do {
            _ = try vm.bus.grantFastPath(space: space, address: site.address, size: Int(site.size), direction: site.direction,
                                         ring: ring, slot: FastPathSlotStorage(count: 1)[0], enableWord: word)
        } catch {
            throw DMPRefusal(.fastPath, "\(error)")
        }
        vm.bus.revokeFastPath(space: space, address: site.address, enableWord: word)
    }

    /// Revokes what `grants` were given (a plan that failed after asking the devices).
    func revoke(_ grants: [Grant]) {
        for g in grants {
            guard let w = g.plan.enableWord, let at = g.plan.grant else { continue }
            w.store(false)
            vm.bus.revokeFastPath(space: at.space, address: at.address, enableWord: w)
        }
    }

    /// A fast path for the report.
    static func describe(_ k: FastPathKind) -> String {
        switch k {
        case .constantRead(let v): "constant 0x\(String(v, radix: 16))"
        case .sharedSlotRead(let s): "shared slot \(s)"
        case .discardWrite: "discard"
        case .ringAppend(let r, let m): "ring \(r) (\(m == .synchronous ? "synchronous" : "asynchronous"))"
        case .tscCounter: "TSC counter"
        }
    }
}

extension PatchPlanner {
    /// Plans the patch for the candidate `located` (with `siblings`: other hot-enough sites that
    /// may share a function copy), and applies it unless this is a dry run.
    /// `live`: the patches in place (their function copies' calls of the function copied here are entries too).
    ///
    /// `folding`: live instruction stubs inside the function a copy is made of (``stubsToFold(for:in:)``): the copy
    /// is decoded with their instructions back and serves their sites inline (their grants, enable words and hit
    /// counters kept); their jumps are taken back or become the copy's entries, in the same pause. Without this the
    /// copy would copy their `jmp stub`, and every stub returns into the original, leaving the copy there.
    package func plan(_ site: ExitSite, located: LocatedInstruction, registersAtExit: Registers?,
                      siblings: [ExitSite] = [], hotAt: ContinuousClock.Instant, owner: Int,
                      live: [AppliedPatch] = [], folding stubs: [AppliedPatch] = []) throws(DMPRefusal) -> PlanOutcome {
        let implantSite = ImplantSite(located)
        // Where the guest maps the implant for this site (identity first), checked on the first code page and a data page.
        let probeCode = GuestRange(start: implant.area.start, size: Implant.pageSize)
        let probeData = implant.dataProbe
        let placement = try implant.placement(for: implantSite, code: probeCode, data: [probeData], memory: vm.memory)
        let memoryTarget = PatchPlanner.memoryTarget(of: located, registers: registersAtExit)
        var grants: [Grant] = []
        grants.append(try grant(for: site, instruction: located.instruction, virtualAddress: located.virtualAddress,
                                physicalAddress: located.physicalAddress, memoryTarget: memoryTarget, cpl: located.cpl,
                                placement: placement, paging: located.paging, kick: ringKick(for: located)))
        do throws(DMPRefusal) {
            let outcome: PlanOutcome
            if located.instruction.length >= 5 && configuration.strategies.contains(.instructionStub) {
                outcome = try stub(located, grants[0], placement: placement, owner: owner)
            } else if configuration.strategies.contains(.functionCopy) {
                let folded = Set(stubs.flatMap(\.grants).map(\.plan.virtualAddress))
                let image = stubs.isEmpty ? nil : codeImage(paging: located.paging)
                    .restoring(stubs.flatMap(\.writes).map { PatchWrite(address: $0.virtual, original: $0.original, replacement: $0.replacement) })
                let more = siblingGrants(siblings.filter { s in !stubs.contains { $0.sites.contains(s) } }, of: located,
                                         placement: placement, image: image, primary: (site, memoryTarget))
                revoke(more.filter { folded.contains($0.plan.virtualAddress) })
                grants += more.filter { !folded.contains($0.plan.virtualAddress) }
                outcome = try functionCopy(located, stubs.flatMap(\.grants) + grants, placement: placement, owner: owner,
                                           rebuilding: stubs, live: live)
            } else {
                throw DMPRefusal(.plan, "\(located.instruction) is \(located.instruction.length) bytes and function copies are off")
            }
            return outcome
        } catch {
            revoke(grants)
            throw error
        }
    }

    /// The live instruction stubs among `patches` that a function copy planned for `located` folds in (``plan(_:located:registersAtExit:siblings:hotAt:owner:live:folding:)``):
    /// those whose patched instruction lies in the sized function holding `located`, when `located` gets a copy.
    package func stubsToFold(for located: LocatedInstruction, in patches: [Int: AppliedPatch]) -> [Int] {
        guard configuration.strategies.contains(.functionCopy),
              located.instruction.length < 5 || !configuration.strategies.contains(.instructionStub),
              let f = configuration.symbols.symbols.first(where: { $0.isFunction && $0.size > 0 && located.virtualAddress >= $0.address
                                                                   && located.virtualAddress &- $0.address < $0.size }) else { return [] }
        return patches.filter { _, p in
            p.copy == nil && !p.grants.isEmpty && p.writes.allSatisfy { $0.virtual >= f.address && $0.virtual &- f.address < f.size }
        }.keys.sorted()
    }

    /// Rebuilds the function copy of `old` for `site`, a new hot instruction that `located` found running inside
    /// that copy (or inside a copy it retired), or inside the original function itself (a thread that had not
    /// entered the copy yet): the new copy serves `old`'s sites and `site` (and siblings a static reading
    /// locates), its entries replace the old ones, and the old copy is evicted (its pads jump to the new copy's
    /// corresponding points). The old copy's code is never freed: a thread may still be inside it, and it leaves
    /// it at its next pad, return or exit jump.
    /// `live`: the patches in place, as for ``plan(_:located:registersAtExit:siblings:hotAt:owner:live:folding:)``.
    package func rebuild(_ old: AppliedPatch, adding site: ExitSite, located: LocatedInstruction, registersAtExit: Registers?,
                         siblings: [ExitSite] = [], owner: Int, live: [AppliedPatch] = []) throws(DMPRefusal) -> PlanOutcome {
        guard let current = old.copy else {
            throw DMPRefusal(.plan, "the instruction runs inside an instruction stub, which serves one instruction")
        }
        guard configuration.strategies.contains(.functionCopy) else { throw DMPRefusal(.plan, "function copies are off") }
        let name = current.function.symbol.name
        let holder: DecodedFunction
        let k: Int
        if let f = current.function(containing: located.virtualAddress) {
            guard let i = f.index(at: located.virtualAddress) else {
                throw DMPRefusal(.plan, "\(hex(located.virtualAddress)) is no instruction boundary of \(f.symbol.name) as it was copied")
            }
            holder = f
            k = i
        } else {
            // A copied instruction, or the original instruction a body runs when its runtime port or address is
            // not one its routes serve (an out-of-line `outb` called for a port that was not hot when the copy was made).
            guard let copy = old.copy(holding: located.virtualAddress),
                  let piece = copy.pieces.first(where: {
                      $0.copy.lowerBound == located.virtualAddress && ($0.kind == .copied || $0.kind == .relocated)
                  }) ?? copy.pieces.first(where: { p in
                      p.kind == .rewritten && p.copy.contains(located.virtualAddress)
                          && current.function(containing: p.original).flatMap { f in f.index(at: p.original).map { f.instructions[$0] } }
                              .map { $0.mnemonic == located.instruction.mnemonic && $0.bytes == located.instruction.bytes } == true
                  }),
                  let f = current.function(containing: piece.original), let i = f.index(at: piece.original) else {
                throw DMPRefusal(.plan, "the instruction at \(hex(located.virtualAddress)) in the copy of \(name) is no copied instruction of the original")
            }
            holder = f
            k = i
        }
        let insn = holder.instructions[k]
        guard insn.mnemonic == located.instruction.mnemonic, insn.length == located.instruction.length,
              insn.groups.contains(.portIO) || !insn.memoryOperands.isEmpty else {
            throw DMPRefusal(.plan, "\(located.instruction) in the copy of \(name) does not match \(insn) at \(holder.location(insn.address))")
        }
        // The same instruction at its place in the original, as the planner's other paths see it.
        var at = located
        at.instruction = insn
        at.virtualAddress = insn.address
        do { at.physicalAddress = try vm.memory.translate(insn.address, paging: located.paging, access: [.execute]).physical } catch {
            throw DMPRefusal(.plan, "\(holder.location(insn.address)) does not translate: \(error)")
        }
        let probeCode = GuestRange(start: implant.area.start, size: Implant.pageSize)
        let probeData = implant.dataProbe
        let placement = try implant.placement(for: ImplantSite(at), code: probeCode, data: [probeData], memory: vm.memory)
        // The registers are those of the copy's instruction: a RIP-relative operand was refitted to the same target.
        let memoryTarget = PatchPlanner.memoryTarget(of: located, registers: registersAtExit)
        var added = [try grant(for: site, instruction: insn, virtualAddress: insn.address, physicalAddress: at.physicalAddress,
                               memoryTarget: memoryTarget, cpl: at.cpl, placement: placement, paging: at.paging,
                               kick: ringKick(for: at))]
        do throws(DMPRefusal) {
            let served = Set(old.grants.map(\.plan.virtualAddress))
            let image = codeImage(paging: at.paging)
                .restoring(old.writes.map { PatchWrite(address: $0.virtual, original: $0.original, replacement: $0.replacement) })
            added += siblingGrants(siblings.filter { !old.sites.contains($0) }, of: at, placement: placement, image: image,
                                   primary: (site, memoryTarget))
                .filter { !served.contains($0.plan.virtualAddress) }
            return try functionCopy(at, old.grants + added, placement: placement, owner: owner, rebuilding: [old],
                                    promotions: current.promotions, live: live)
        } catch {
            revoke(added)
            throw error
        }
    }

    /// The instruction stub: the hot instruction (≥ 5 bytes) becomes `jmp stub`; the stub serves the fast path and jumps back.
    private func stub(_ located: LocatedInstruction, _ g: Grant, placement: ImplantPlacement, owner: Int) throws(DMPRefusal) -> PlanOutcome {
        let preserveFlags = instruction(at: located.endAddress, located: located)
            .map { !FastPathEmitter.arithmeticFlagsDead(before: $0) } ?? true
        let trial = try FastPathEmitter.instructionStub(for: located.instruction, routes: [g.route], preserveFlags: preserveFlags,
                                                        lahf: lahf, at: placement.virtualAddress(of: implant.area.start))
        let code = try implant.allocateCode(trial.bytes.count + 64)
        // Refused (or a dry run) before anything was written there: the range goes back to the implant.
        var written = false
        defer { if !written { implant.releaseCode(code) } }
        let va = placement.virtualAddress(of: code.start)
        let stub = try FastPathEmitter.instructionStub(for: located.instruction, routes: [g.route], preserveFlags: preserveFlags,
                                                       lahf: lahf, at: va)
        guard stub.bytes.count <= Int(code.size) else { throw DMPRefusal(.encode, "the stub grew from \(trial.bytes.count) to \(stub.bytes.count) bytes") }
        _ = try implant.placement(for: ImplantSite(located), code: code, data: [], memory: vm.memory)
        let jump = try FastPathEmitter.siteJump(replacing: located.instruction, to: va)
        let write = CodeWrite(virtual: located.virtualAddress, physical: located.physicalAddress,
                              original: located.instruction.bytes, replacement: jump)
        let pages = try guardPages(for: [write], extra: [], located: located)
        return try finish(strategy: "instruction stub", writes: [write], pages: pages, code: code, bytes: stub.bytes,
                          placement: placement, owner: owner, sites: [g.plan], copy: nil, grants: [g], located: located,
                          written: &written)
    }

    /// The function copy: the enclosing sized function copied with the hot instructions rewritten, entered as the plan allows.
    ///
    /// `rebuilding`: the function copies this one replaces, the one whose patch id it keeps first (`grants` then
    /// hold their sites' grants too): the function is decoded from the guest's own bytes (the old entries taken
    /// back), its dead padding may be used again, every entry is retargeted from an old copy to the new one (or
    /// restored where the new plan has none), and the old copies' pads become jumps to the new copy's
    /// corresponding points, all in one pause.
    /// `promotions`: calls of the function holding them promoted to calls of accessor copies (``CallPromotion``):
    /// that function is copied, the accessors after it, and a grant inside an accessor is served there.
    func functionCopy(_ located: LocatedInstruction, _ grants: [Grant], placement: ImplantPlacement,
                              owner: Int, rebuilding olds: [AppliedPatch] = [],
                              promotions: [CallPromotion] = [], live: [AppliedPatch] = []) throws(DMPRefusal) -> PlanOutcome {
        let old = olds.first
        let oldWrites = olds.flatMap(\.writes)
        let image = codeImage(paging: located.paging)
            .restoring(oldWrites.map { PatchWrite(address: $0.virtual, original: $0.original, replacement: $0.replacement) })
        let oldPadding = oldWrites.filter(\.guardsItsStart).map { $0.virtual..<$0.virtual &+ UInt64($0.original.count) }
        let usedPadding = self.usedPadding.filter { !oldPadding.contains($0) }
                // One rewrite per instruction, serving every granted access of it (an out-of-line `outb(port, value)`
        // called for several ports: the body checks the runtime port against each route).
        var byInstruction: [(address: UInt64, routes: [FastPathRoute])] = []
        for g in grants {
            if let k = byInstruction.firstIndex(where: { $0.address == g.plan.virtualAddress }) {
                byInstruction[k].routes.append(g.route)
            } else {
                byInstruction.append((g.plan.virtualAddress, [g.route]))
            }
        }
        let lahf = lahf
        let allRewrites = byInstruction.map { (address, routes) in
            let insn = instruction(at: address, located: located, image: image)
            let preserveFlags = insn.flatMap { instruction(at: $0.nextAddress, located: located, image: image) }
                .map { !FastPathEmitter.arithmeticFlagsDead(before: $0) } ?? true
            return HotRewrite(address: address) { (a: inout X86Assembler) throws(DMPRefusal) in
                guard let insn else { throw DMPRefusal(.plan, "the hot instruction at \(hex(address)) is gone") }
                try FastPathEmitter.emitBody(for: insn, routes: routes, preserveFlags: preserveFlags, lahf: lahf, into: &a)
            }
        }
        // With promoted calls the copy is the caller's, its accessors copied after it; each rewrite goes to the
        // function that holds it.
        var rewrites = allRewrites
        var accessors: [FunctionCopy.Accessor] = []
        for start in promotions.flatMap(\.accessors) where !accessors.contains(where: { $0.function.start == start }) {
            guard let symbol = image.function(containing: start), symbol.address == start else {
                throw DMPRefusal(.plan, "the promoted accessor at \(hex(start)) starts no sized function")
            }
            let f = try image.decode(symbol, disassembler: disassembler)
            accessors.append(FunctionCopy.Accessor(function: f, rewrites: rewrites.filter { f.contains($0.address) }))
            rewrites.removeAll { f.contains($0.address) }
        }
        let trial = try FunctionCopyPlan.make(hot: rewrites, in: image, at: placement.virtualAddress(of: implant.area.start),
                                              disassembler: disassembler, usedPadding: usedPadding, allowNoEntry: true,
                                              promotions: promotions, accessors: accessors)
        let code = try implant.allocateCode(trial.copy.bytes.count + 256)
        // Refused (or a dry run) before anything was written there: the range goes back to the implant.
        var written = false
        defer { if !written { implant.releaseCode(code) } }
        let va = placement.virtualAddress(of: code.start)
        let plan = try FunctionCopyPlan.make(hot: rewrites, in: image, at: va, disassembler: disassembler,
                                             usedPadding: usedPadding, allowNoEntry: true,
                                             promotions: promotions, accessors: accessors)
        guard plan.copy.bytes.count <= Int(code.size) else {
            throw DMPRefusal(.encode, "the copy grew from \(trial.copy.bytes.count) to \(plan.copy.bytes.count) bytes")
        }
        _ = try implant.placement(for: ImplantSite(located), code: code, data: [], memory: vm.memory)
        // Every entry the plan allows (each a one-instruction write), plus the entry instruction through dead
        // padding when it is 2–4 bytes and nothing enters at the function's start (functions reached only through
        // pointers). A site counts as served only if some entry reaches it in the copy.
        var entries = plan.entries.filter { e in !usedPadding.contains { u in e.deadPadding.map { $0.overlaps(u) } ?? false } }
        let function = plan.copy.function
        // The other live patches: not those this plan replaces.
        let replaced = Set(olds.map(\.implantCode.start))
        let others = live.filter { !replaced.contains($0.implantCode.start) }
        entries += liveCopyCallSites(of: plan.copy, others: others, paging: located.paging)
        // Another live patch's write (a call site it retargeted, a stub's jump) is not this patch's to replace: an
        // entry over it would take that patch's bytes for the guest's and put them back when undone after it.
        let foreign = others.flatMap(\.writes).map { $0.virtual..<$0.virtual &+ UInt64($0.original.count) }
        entries.removeAll { e in e.writes.contains { w in foreign.contains { $0.overlaps(w.range) } } }
        let startKinds: Set<CopyEntry.Kind> = [.functionEntry, .callSite, .tailCallSite, .liveCopyCallSite]
        if !entries.contains(where: { startKinds.contains($0.kind) }),
           let first = function.instructions.first, !entries.contains(where: { $0.site == first.address }) {
            let taken = usedPadding + entries.compactMap(\.deadPadding)
            if let e = try? plan.copy.deadPaddingEntry(hot: first.address, in: image, disassembler: disassembler, avoiding: taken) {
                entries.append(e)
            }
        }
        if let kinds = configuration.copyEntryKinds { entries = entries.filter { kinds.contains($0.kind) } }
        var reached = PatchPlanner.reachable(in: function, from: entries.map { e in
            startKinds.contains(e.kind) ? function.start : e.site
        }, jumpTables: plan.copy.jumpTables)
        // An accessor's copy runs wherever a promoted call naming it is reached.
        for a in plan.copy.accessors where promotions.contains(where: { $0.accessors.contains(a.start) && reached.contains($0.site) }) {
            reached.formUnion(PatchPlanner.reachable(in: a, from: [a.start]))
        }
        guard reached.contains(located.virtualAddress) else {
            // Call sites lie in other functions: name them by the image's own symbols.
            func location(_ a: UInt64) -> String {
                guard !function.contains(a), let s = image.symbols.symbol(containing: a), s.address <= a else { return function.location(a) }
                return a == s.address ? s.name : "\(s.name)+0x\(String(a &- s.address, radix: 16))"
            }
            if let p = promotions.first(where: { p in plan.copy.accessors.contains { $0.contains(located.virtualAddress) && p.accessors.contains($0.start) } }) {
                throw DMPRefusal(.plan, "no entry into the copy of \(function.symbol.name) reaches its promoted call at \(function.location(p.site)) ("
                                 + (plan.entryRefusals.map(\.reason) + entries.map { "\($0.kind.rawValue) at \(location($0.site)) does not lead to it" })
                                    .joined(separator: "; ") + ")")
            }
            let kept = Set(plan.copy.jumpTables.map(\.jump))
            let indirect = plan.copy.indirectJumps.filter { !kept.contains($0) }
            throw DMPRefusal(.plan, "no entry into the copy of \(function.symbol.name) reaches \(located.instruction) ("
                             + (plan.entryRefusals.map(\.reason) + entries.map { "\($0.kind.rawValue) at \(location($0.site)) does not lead to it" }
                                + indirect.map { "the indirect jump at \(function.location($0)) lands in the original" })
                                .joined(separator: "; ") + ")")
        }
        var writes: [CodeWrite] = []
        for entry in entries {
            for w in entry.writes {
                let t: Translation
                do { t = try vm.memory.translate(w.address, paging: located.paging, access: [.execute]) } catch {
                    throw DMPRefusal(.patch, "the entry at \(hex(w.address)) does not translate: \(error)")
                }
                var write = CodeWrite(virtual: w.address, physical: t.physical, original: w.original, replacement: w.replacement,
                                      guardsItsStart: entry.deadPadding.map { $0.lowerBound == w.address } ?? false)
                // A caller's copy made while an earlier copy of the function lived calls that copy (see `implantBytes`).
                if entry.kind == .liveCopyCallSite { write.current = currentCall(at: write, of: function.start) }
                writes.append(write)
            }
        }
        // A rebuild retargets the old entries: each new write finds the old copy's jump where the old plan wrote
        // one; old entries the new plan does not use get the guest's bytes back.
        var restores: [CodeWrite] = []
        if !olds.isEmpty {
            for w in oldWrites {
                let range = w.virtual..<w.virtual &+ UInt64(w.original.count)
                let overlapping = writes.indices.filter { k in range.overlaps(writes[k].virtual..<writes[k].virtual &+ UInt64(writes[k].original.count)) }
                if overlapping.isEmpty {
                    restores.append(CodeWrite(virtual: w.virtual, physical: w.physical, original: w.replacement, replacement: w.original,
                                              guardsItsStart: w.guardsItsStart))
                } else if overlapping.count == 1, let k = overlapping.first, writes[k].virtual == w.virtual,
                          writes[k].original == w.original {
                    writes[k].current = w.replacement
                } else {
                    throw DMPRefusal(.plan, "rebuilding the copy of \(function.symbol.name): a new entry overlaps the old entry at \(hex(w.virtual)) differently")
                }
            }
        }
        // Sites no entry reaches keep exiting: not served, their grants given back.
        var served: [Grant] = []
        var unreached: [Grant] = []
        for g in grants { if reached.contains(g.plan.virtualAddress) { served.append(g) } else { unreached.append(g) } }
        if let lost = unreached.first(where: { g in olds.contains { $0.sites.contains(g.plan.site) } }) {
            throw DMPRefusal(.plan, "rebuilding the copy of \(function.symbol.name): no entry of the new copy reaches \(hex(lost.plan.virtualAddress)), which an old copy serves")
        }
        revoke(unreached)
        // The copied functions' pages (and promoted calls' thunks') are guarded too: a write there invalidates the copy.
        var functionPages: [UInt64] = []
        for source in plan.copy.sources {
            var v = source.address & ~0xfff
            while v < source.address &+ UInt64(source.bytes.count) {
                if let t = try? vm.memory.translate(v, paging: located.paging) { functionPages.append(t.physical.rawValue & ~0xfff) }
                v &+= 0x1000
            }
        }
        // The implant pages of the copies a rebuild retires stay guarded (a thread may still run in them).
        let retiredPages = olds.flatMap(\.guardedPages).filter { implant.area.contains(GuestAddress($0), length: 1) }
        // Calls retargeted inside live copies write implanted code: its pages are the implant's (no guest data,
        // no page tables), guarded while this patch relies on them.
        let inImplant = { (w: CodeWrite) in self.implant.area.contains(w.physical, length: UInt64(w.original.count)) }
        let implantPages = writes.filter(inImplant).map { $0.physical.rawValue & ~0xfff }
        let pages = try guardPages(for: writes.filter { !inImplant($0) }, extra: functionPages, located: located)
            + retiredPages + implantPages
        let name = plan.copy.function.symbol.name
        let kinds = Array(Set(entries.map(\.kind.rawValue))).sorted().joined(separator: ", ")
        // Instruction stubs folded into a new copy are no rebuild of it.
        let rebuilds = old.flatMap { $0.copy == nil ? nil : $0.retired.count + 1 } ?? 0
        let folded = olds.filter { $0.copy == nil }.count
        let promoted = plan.copy.promotions.map { p in
            p.accessors.compactMap { a in plan.copy.accessors.first { $0.start == a }?.symbol.name }.joined(separator: "/")
                + " at \(function.location(p.site))"
        }
        let outcome = try finish(strategy: "function copy of \(name) via \(kinds)"
                                    + (promoted.isEmpty ? "" : ", promoted call to " + promoted.joined(separator: ", "))
                                    + (rebuilds > 0 ? " (rebuilt \(rebuilds)x)" : "")
                                    + (folded > 0 ? ", \(folded) instruction stub\(folded == 1 ? "" : "s") folded in" : ""),
                                 writes: writes, pages: pages, code: code,
                                 bytes: implantBytes(of: plan.copy, others: others), placement: placement, owner: owner,
                                 sites: served.map(\.plan), copy: plan.copy, grants: served, rebuilding: olds,
                                 extraWrites: restores + olds.flatMap { $0.evictionWrites(to: plan.copy) }, located: located,
                                 written: &written)
        if !configuration.dryRun {
            // Old padding is either used again by the new entries or restored (a rebuild).
            self.usedPadding = usedPadding + entries.compactMap(\.deadPadding)
            copyStarts[plan.copy.address] = function.start
        }
        return outcome
    }

    /// The original instruction addresses control can reach in `function` from `starts`, following
    /// fall-through, direct branches inside the function and the dispatches of `jumpTables` (which stay in the
    /// copy); calls return; other indirect jumps and returns end a path.
    static func reachable(in function: DecodedFunction, from starts: [UInt64], jumpTables: [JumpTable] = []) -> Set<UInt64> {
        var seen: Set<UInt64> = []
        var work = starts.filter { function.index(at: $0) != nil }
        var dispatches: [UInt64: Set<UInt64>] = [:]
        for t in jumpTables { dispatches[t.jump, default: []].formUnion(t.targets(in: function)) }
        while let a = work.popLast() {
            guard seen.insert(a).inserted, let k = function.index(at: a) else { continue }
            let i = function.instructions[k]
            let g = i.groups
            if let b = i.branch, !g.contains(.call), function.contains(b.target) { work.append(b.target) }
            work += dispatches[a] ?? []
            let ends = g.contains(.return) || g.contains(.interruptReturn) || (g.contains(.jump) && !g.contains(.conditionalBranch))
                || i.mnemonic.hasPrefix("ud") || i.mnemonic == "hlt"
            if !ends, k + 1 < function.instructions.count { work.append(function.instructions[k + 1].address) }
        }
        return seen
    }

    /// Grants for sibling sites that a static reading of the function locates exactly (best effort: a sibling
    /// that cannot be located or granted is left out and may become hot on its own later).
    ///
    /// `primary`: the located site and, for MMIO, the linear address its operand had at the exit. A sibling's memory
    /// operand cannot be evaluated without its registers; an MMIO sibling in the primary's 4 KiB page is given the
    /// primary's linear page (a loop unrolled into one store per element, several registers of one device reached from
    /// one base): its body compares the runtime address with that one and executes the original access on any other.
    func siblingGrants(_ siblings: [ExitSite], of located: LocatedInstruction, placement: ImplantPlacement,
                               image given: CodeImage? = nil, primary: (site: ExitSite, memoryTarget: UInt64?)) -> [Grant] {
        let image = given ?? codeImage(paging: located.paging)
        guard let symbol = image.function(containing: located.virtualAddress),
              let function = try? image.decode(symbol, disassembler: disassembler) else { return [] }
        var out: [Grant] = []
        for s in siblings {
            let matches = function.instructions.filter { i in
                (i.address == s.rip || i.nextAddress == s.rip) && PatchPlanner.plausible(i, for: s)
            }
            guard matches.count == 1, let i = matches.first,
                  let t = try? vm.memory.translate(i.address, paging: located.paging, access: [.execute]) else { continue }
            var memoryTarget: UInt64?
            if s.kind == .mmio {
                guard let m = PatchPlanner.siblingMemoryTarget(s, primary: primary.site, primaryTarget: primary.memoryTarget) else { continue }
                memoryTarget = m
            }
            if let g = try? grant(for: s, instruction: i, virtualAddress: i.address, physicalAddress: t.physical,
                                  memoryTarget: memoryTarget, cpl: located.cpl, placement: placement, paging: located.paging,
                                  kick: ringKick(for: located)) {
                out.append(g)
            }
        }
        return out
    }

    /// The linear address an MMIO sibling's body serves: the primary's linear page at the sibling's page offset,
    /// when both accesses fall in one 4 KiB guest-physical page (nil otherwise: the sibling is left out).
    package static func siblingMemoryTarget(_ sibling: ExitSite, primary: ExitSite, primaryTarget: UInt64?) -> UInt64? {
        guard sibling.kind == .mmio, primary.kind == .mmio, let m = primaryTarget,
              m & 0xfff == primary.address & 0xfff, sibling.address >> 12 == primary.address >> 12 else { return nil }
        return (m & ~0xfff) | (sibling.address & 0xfff)
    }

    /// Whether `i` could make `site`'s access: port I/O of the right direction and width (and port, for an
    /// immediate); for MMIO, a plain load or store of the site's width in the site's direction.
    package static func plausible(_ i: X86Instruction, for site: ExitSite) -> Bool {
        if site.kind == .mmio {
            guard !i.groups.contains(.portIO), !i.groups.contains(.string), case .success(let shape) = i.accessShape else { return false }
            switch shape {
            case .load(let w, _, _, _): return site.direction == .read && w == Int(site.size)
            case .store(let w, _, _): return site.direction == .write && w == Int(site.size)
            default: return false
            }
        }
        guard i.groups.contains(.portIO), !i.groups.contains(.string) else { return false }
        let isIn = i.mnemonic.hasPrefix("in")
        guard isIn == (site.direction == .read) else { return false }
        var width = 0
        var port: Int64?
        for o in i.operands {
            switch o.operand {
            case .register(.al): width = 1
            case .register(.ax): width = 2
            case .register(.eax): width = 4
            case .immediate(let v): port = v
            default: break
            }
        }
        guard width == Int(site.size) else { return false }
        if let port { return UInt64(bitPattern: port) & 0xffff == site.address }
        return true
    }

    /// The instruction at `address` in the located instruction's address space, decoded from `image`
    /// (by default the guest's memory now).
    func instruction(at address: UInt64, located: LocatedInstruction, image given: CodeImage? = nil) -> X86Instruction? {
        if address == located.virtualAddress { return located.instruction }
        let image = given ?? codeImage(paging: located.paging)
        guard let symbol = image.function(containing: address), let f = try? image.decode(symbol, disassembler: disassembler),
              let k = f.index(at: address) else { return nil }
        return f.instructions[k]
    }

    /// The image's code as it is in guest memory now: each loaded segment the guest maps at the virtual address it
    /// is linked at (`p_vaddr`, from the image's layout: a higher-half kernel's code runs above its physical
    /// address), or, without a layout, at its physical address (identity).
    func codeImage(paging: PagingContext) -> CodeImage {
        var regions: [CodeImage.Region] = []
        let segments = configuration.imageLayout.map { l in Array(zip(l.segments, l.virtualAddresses)) }
            ?? configuration.codeRanges.map { ($0, $0.start.rawValue) }
        for (r, v) in segments {
            guard let t = try? vm.memory.translate(v, paging: paging), t.physical == r.start,
                  let bytes = try? vm.memory.readBytes(at: r.start, count: Int(min(r.size, 64 << 20))) else { continue }
            regions.append(CodeImage.Region(address: v, bytes: bytes))
        }
        return CodeImage(regions: regions, symbols: configuration.symbols)
    }

    /// The guest-physical pages to guard for `writes` and `extra`, checked against the guard rules.
    private func guardPages(for writes: [CodeWrite], extra: [UInt64], located: LocatedInstruction) throws(DMPRefusal) -> [UInt64] {
        var pages = Set(extra)
        for w in writes {
            pages.insert(w.physical.rawValue & ~0xfff)
            let last = w.physical.rawValue &+ UInt64(max(w.original.count, 1)) &- 1
            if last & ~0xfff != w.physical.rawValue & ~0xfff {
                guard let t = try? vm.memory.translate((w.virtual &+ UInt64(w.original.count) &- 1), paging: located.paging) else {
                    throw DMPRefusal(.guard, "the second page of the instruction at \(hex(w.virtual)) does not translate")
                }
                pages.insert(t.physical.rawValue & ~0xfff)
            }
        }
        let sorted = pages.sorted()
        let offset = located.virtualAddress &- located.physicalAddress.rawValue
        try GuardPolicy.check(sorted, memory: vm.memory, sregs: located.specialRegisters, symbols: configuration.symbols,
                              layout: configuration.imageLayout, virtualOf: { $0 &+ offset })
        return sorted
    }

    /// Writes the implant and the patch (or, for a dry run, nothing) and records the outcome.
    /// A rebuild (`rebuilding` the patch it replaces) also applies `extraWrites` (old entries restored, the old copy's
    /// pads evicted) in the same pause, releases the old patch's guards and reports only the sites it adds.
    private func finish(strategy: String, writes: [CodeWrite], pages: [UInt64], code: GuestRange, bytes: [UInt8],
                        placement: ImplantPlacement, owner: Int, sites: [SitePlan], copy: FunctionCopy?, grants: [Grant] = [],
                        rebuilding olds: [AppliedPatch] = [], extraWrites: [CodeWrite] = [],
                        located: LocatedInstruction, written: inout Bool) throws(DMPRefusal) -> PlanOutcome {
        let fresh = sites.filter { s in !olds.contains { $0.sites.contains(s.site) } }
        guard !configuration.dryRun else {
            return PlanOutcome(applied: nil, strategy: strategy, sites: fresh, pausedNanoseconds: 0)
        }
        // The hit counter and the wait counter after it start at zero.
        for s in fresh { if let h = s.hitCounter { try? vm.memory.writeAsGuardOwner([UInt8](repeating: 0, count: 16), at: h) } }
        implant.registerOwner(owner, code: code, placement: placement)
        // The implanted code is guarded too: a guest that overwrites it undoes the patches that enter it.
        var codePages: [UInt64] = []
        var p = code.start.rawValue & ~0xfff
        while p < code.start.rawValue &+ code.size { codePages.append(p); p &+= 0x1000 }
        let pages = Array(Set(pages + codePages)).sorted()
        let mapping = self.mapping(for: sites, site: ImplantSite(located), placement: placement, code: code)
        let paused: UInt64
        do throws(DMPRefusal) {
            paused = try patcher.apply(writes + extraWrites, guarding: pages, implant: [(code.start, bytes)],
                                       releasing: olds.flatMap(\.guardedPages), willWrite: { written = true }) { () throws(DMPRefusal) in
                try checkAtWrite(writes, mapping: mapping, copy: copy, located: located, replacing: olds.flatMap(\.writes))
            }
        } catch {
            // Refused before the write: the caller gives the code range back, so it has no owner any more.
            if !written { implant.unregisterOwner(owner, code: code, placement: placement) }
            throw error
        }
        var applied = AppliedPatch(writes: writes, guardedPages: pages, implantCode: code, strategy: strategy,
                                   sites: sites.map(\.site), appliedAt: .now, copy: copy,
                                   codeVirtualStart: placement.virtualAddress(of: code.start), mapping: mapping)
        applied.grants = grants
        for old in olds {
            applied.retired += old.retired
            if let c = old.copy { applied.retired.append((c, old.codeVirtualStart &- old.implantCode.start.rawValue)) }
        }
        return PlanOutcome(applied: applied, strategy: strategy, sites: fresh, pausedNanoseconds: paused)
    }
}

extension PatchPlanner {
    /// The pages a patch reaches through the guest's page tables: its code, its sites' enable words and hit
    /// counters, and the rings its ring appends write.
    func mapping(for sites: [SitePlan], site: ImplantSite, placement: ImplantPlacement, code: GuestRange) -> ImplantMapping {
        let data = sites.compactMap(\.data)
        let ringRanges: [GuestRange] = sites.compactMap { s in
            guard let i = s.ring, let rings else { return nil }
            return GuestRange(start: GuestAddress(rings.base.rawValue &+ UInt64(i) &* rings.stride),
                              size: PVRingLayout.slotsOffset &+ UInt64(rings.slotCount) &* PVRingLayout.slotSize)
        }
        return ImplantMapping(site: site, placement: placement, code: code, data: data, rings: ringRanges)
    }

    /// What must still hold when the patch is written, with every vCPU paused (another vCPU, a device or the
    /// guest's page-table writes may have changed it since the plan): the implant and rings mapped as planned,
    /// every patched instruction's page still present, executable and the same frame, and a copied function's
    /// bytes those it was copied from.
    /// `replacing`: the entries of the patch a rebuild replaces, still in the function's bytes (taken back for the check).
    func checkAtWrite(_ writes: [CodeWrite], mapping: ImplantMapping, copy: FunctionCopy?,
                      located: LocatedInstruction, replacing old: [CodeWrite] = []) throws(DMPRefusal) {
        if let why = mapping.problem(in: vm.memory) {
            throw DMPRefusal(.implant, "at the moment of writing, the guest's page tables no longer map the implant as planned: \(why)")
        }
        let fetch: PageAccess = located.cpl == 3 ? [.execute, .user] : [.execute]
        for w in writes {
            let page = w.physical.rawValue & ~(Implant.pageSize - 1)
            if let why = ImplantMapping.check(virtual: w.virtual & ~(Implant.pageSize - 1), physical: page, access: fetch,
                                              paging: located.paging, cpl: located.cpl, memory: vm.memory) {
                throw DMPRefusal(.patch, "the code at \(hex(w.virtual)) is not the same at the moment of writing: \(why)")
            }
        }
        for source in copy?.sources ?? [] {
            let end = source.address &+ UInt64(source.bytes.count)
            var v = source.address
            while v < end {
                let chunk = min(end &- v, Implant.pageSize &- (v & (Implant.pageSize &- 1)))
                let offset = Int(v &- source.address)
                guard let t = try? vm.memory.translate(v, paging: located.paging, access: fetch),
                      let read = try? vm.memory.readBytes(at: t.physical, count: Int(chunk)),
                      offset + Int(chunk) <= source.bytes.count,
                      CodeImage(regions: [.init(address: v, bytes: read)], symbols: SymbolTable())
                        .restoring(old.map { PatchWrite(address: $0.virtual, original: $0.original, replacement: $0.replacement) })
                        .regions[0].bytes[...] == source.bytes[offset..<(offset + Int(chunk))] else {
                    let name = configuration.symbols.symbolize(source.address) ?? hex(source.address)
                    throw DMPRefusal(.patch, "\(name) changed (or was unmapped) at \(hex(v)) between the plan and the write")
                }
                v &+= chunk
            }
        }
    }
}

import VMMKit

/// The planner's entry points: a new patch for a hot instruction (an instruction stub, or a function copy with
/// the stubs it folds in), and the rebuild of a live copy for a new hot instruction inside it.
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
}

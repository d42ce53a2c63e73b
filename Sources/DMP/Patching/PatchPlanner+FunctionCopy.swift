import VMMKit

/// The function copy: the hot instructions' function copied with them rewritten, its entries chosen, checked
/// to reach the hot instructions, and written (Documentation/DMP.md).
extension PatchPlanner {
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
        // An accessor's copy runs wherever a promoted call naming it is reached (a promoted call inside an accessor
        // once that accessor is: each pass adds at least one accessor, so at most as many passes as accessors).
        var grown = true
        while grown {
            grown = false
            for a in plan.copy.accessors where !reached.contains(a.start)
                && promotions.contains(where: { $0.accessors.contains(a.start) && reached.contains($0.site) }) {
                reached.formUnion(PatchPlanner.reachable(in: a, from: [a.start]))
                grown = true
            }
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
                + " at \((plan.copy.function(containing: p.site) ?? function).location(p.site))"
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
}

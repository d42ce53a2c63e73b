import VMMKit

/// Writing a planned patch: the pages it guards, the write itself with every vCPU paused, and what must still
/// hold at that moment.
extension PatchPlanner {
    /// The guest-physical pages to guard for `writes` and `extra`, checked against the guard rules.
    func guardPages(for writes: [CodeWrite], extra: [UInt64], located: LocatedInstruction) throws(DMPRefusal) -> [UInt64] {
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
    func finish(strategy: String, writes: [CodeWrite], pages: [UInt64], code: GuestRange, bytes: [UInt8],
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
    /// also by every other vCPU's page tables that map a patched instruction's page (``checkOtherAddressSpaces``),
    /// every patched instruction's page still present, executable and the same frame, and a copied function's
    /// bytes those it was copied from.
    /// `replacing`: the entries of the patch a rebuild replaces, still in the function's bytes (taken back for the check).
    func checkAtWrite(_ writes: [CodeWrite], mapping: ImplantMapping, copy: FunctionCopy?,
                      located: LocatedInstruction, replacing old: [CodeWrite] = []) throws(DMPRefusal) {
        if let why = mapping.problem(in: vm.memory) {
            throw DMPRefusal(.implant, "at the moment of writing, the guest's page tables no longer map the implant as planned: \(why)")
        }
        let fetch: PageAccess = located.cpl == 3 ? [.execute, .user] : [.execute]
        try checkOtherAddressSpaces(writes, mapping: mapping, located: located, fetch: fetch)
        for w in writes {
            let page = w.physical.rawValue & ~(Implant.pageSize - 1)
            if let why = ImplantMapping.check(virtual: w.virtual & ~(Implant.pageSize - 1), physical: page, access: fetch,
                                              paging: located.paging, cpl: located.cpl, memory: vm.memory) {
                throw DMPRefusal(.patch, "the code at \(hex(w.virtual)) is not the same at the moment of writing: \(why)")
            }
        }
        for source in copy?.sources ?? [] {
            let name = configuration.symbols.symbolize(source.address) ?? hex(source.address)
            let end = source.address &+ UInt64(source.bytes.count)
            var current: [UInt8] = []
            current.reserveCapacity(source.bytes.count)
            var v = source.address
            while v < end {
                let chunk = min(end &- v, Implant.pageSize &- (v & (Implant.pageSize &- 1)))
                guard let t = try? vm.memory.translate(v, paging: located.paging, access: fetch),
                      let read = try? vm.memory.readBytes(at: t.physical, count: Int(chunk)) else {
                    throw DMPRefusal(.patch, "\(name) changed (or was unmapped) at \(hex(v)) between the plan and the write")
                }
                current += read
                v &+= chunk
            }
            // The old entries are taken back over the whole function at once: one may straddle a page boundary.
            let restored = CodeImage(regions: [.init(address: source.address, bytes: current)], symbols: SymbolTable())
                .restoring(old.map { PatchWrite(address: $0.virtual, original: $0.original, replacement: $0.replacement) })
                .regions[0].bytes
            if restored.count != source.bytes.count || restored != source.bytes {
                let k = source.bytes.indices.first { $0 >= restored.count || restored[$0] != source.bytes[$0] } ?? 0
                throw DMPRefusal(.patch, "\(name) changed (or was unmapped) at \(hex(source.address &+ UInt64(k))) between the plan and the write")
            }
        }
    }

    /// A vCPU on page tables of its own (another CR3 than the site's, in the site's paging mode) that maps a
    /// patched instruction's page to the same frame, executable at the site's CPL, runs the patched code: its
    /// tables must map the implant and rings as planned too, or it would fault in the implant (an AP whose own
    /// tables leave the VMM's reserved area unmapped: `Guests/c-smp-cpl3-aptables`). Runs with every vCPU paused;
    /// a vCPU that loads such tables after the write is not seen here.
    func checkOtherAddressSpaces(_ writes: [CodeWrite], mapping: ImplantMapping, located: LocatedInstruction,
                                 fetch: PageAccess) throws(DMPRefusal) {
        var seen: Set<UInt64> = [located.paging.cr3 & ExitContext.addressSpaceMask]
        for v in vm.vcpus {
            let sregs: SpecialRegisters
            do { sregs = try v.specialRegisters() } catch {
                throw DMPRefusal(.patch, "cannot read vCPU \(v.id)'s page-table base to check that it maps the implant: \(error)")
            }
            let paging = PagingContext(sregs)
            guard paging.mode == located.paging.mode, seen.insert(paging.cr3 & ExitContext.addressSpaceMask).inserted else { continue }
            let runsPatchedCode = writes.contains { w in
                ImplantMapping.check(virtual: w.virtual & ~(Implant.pageSize - 1), physical: w.physical.rawValue & ~(Implant.pageSize - 1),
                                     access: fetch, paging: paging, cpl: located.cpl, memory: vm.memory) == nil
            }
            guard runsPatchedCode else { continue }
            if let why = mapping.problem(in: vm.memory, under: paging) {
                throw DMPRefusal(.implant, "vCPU \(v.id) runs the patched code on page tables of its own (CR3 \(hex(paging.cr3))) that do not map the implant as planned: \(why)")
            }
        }
    }
}

import VMMKit
import X86Disassembler

/// What a static reading of the guest's code finds: sibling sites and their grants, the instruction at an
/// address, the image's code as it is in guest memory now.
extension PatchPlanner {
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
            guard let i = PatchPlanner.siblingInstruction(matches, for: s, primary: primary.site, position: located.position),
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

    /// The instruction a sibling's exit names among `candidates` (the function's instructions that start or end at
    /// its exit RIP and could make its access): the only one; or, when one ends and another starts at that RIP
    /// (accesses back to back, as an unrolled loop's stores), the one the hot site's own exit puts RIP at, if the
    /// sibling's exit is of the same kind and direction: the hypervisor leaves RIP at the same place for those
    /// (KVM completes an MMIO write or an `out` before it exits, RIP past the instruction; a read exits with RIP
    /// on it). Anything else is ambiguous: `nil`, the sibling is left out and may become hot on its own.
    package static func siblingInstruction(_ candidates: [X86Instruction], for sibling: ExitSite, primary: ExitSite,
                                           position: RIPPosition) -> X86Instruction? {
        if candidates.count == 1 { return candidates[0] }
        guard candidates.count == 2, sibling.kind == primary.kind, sibling.direction == primary.direction else { return nil }
        switch position {
        case .onInstruction: return candidates.first { $0.address == sibling.rip }
        case .pastInstruction: return candidates.first { $0.nextAddress == sibling.rip }
        case .unknown: return nil
        }
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
        return CodeImage(regions: regions, symbols: configuration.symbols, tables: padTables())
    }

    /// The image's pad tables (``CodeAddressTable/padSections``) as they are in guest memory now: arrays of 8-byte code
    /// addresses (a guest value: it only keeps DMP's writes off those bytes).
    func padTables() -> [CodeAddressTable] {
        guard let layout = configuration.imageLayout else { return [] }
        return layout.sections.compactMap { s -> CodeAddressTable? in
            guard CodeAddressTable.padSections.contains(s.name), s.range.size >= 8,
                  let bytes = try? vm.memory.readBytes(at: s.range.start, count: Int(min(s.range.size, UInt64(CodeAddressTable.maximumAddresses) * 8)))
            else { return nil }
            let addresses = stride(from: 0, to: bytes.count - 7, by: 8).map { o in
                (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[o + $1]) << (8 * UInt64($1)) }
            }
            return CodeAddressTable(name: s.name, addresses: addresses.filter { $0 != 0 }, recordsPads: true)
        }
    }
}

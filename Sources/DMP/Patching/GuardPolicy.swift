import VMMKit

/// Which guest pages DMP may guard (DESIGN.md, DMP step 6): a guard costs an
/// exit per guest write and KVM emulates a locked write to a read-only slot as
/// a plain one, so pages that hold page tables, descriptor tables (GDT, IDT,
/// TSS, LDT) or writable data are never guarded — the patch is refused instead.
package struct GuardPolicy {
    /// The most page-table pages the walk collects before it gives up (and refuses).
    package static let pageTableLimit = 8192

    /// The guest-physical pages the guest's paging structures occupy under `cr3`
    /// (4- or 5-level), or `nil` when there are more than ``pageTableLimit``.
    package static func pageTablePages(memory: GuestMemory, paging: PagingContext, fiveLevel: Bool) -> Set<UInt64>? {
        var pages: Set<UInt64> = []
        let mask: UInt64 = 0x000f_ffff_ffff_f000
        var frontier: [(UInt64, Int)] = [(paging.cr3 & mask, fiveLevel ? 5 : 4)]
        while let (table, level) = frontier.popLast() {
            guard pages.insert(table).inserted else { continue }
            guard pages.count <= pageTableLimit else { return nil }
            guard level > 1 else { continue }
            for i in 0..<512 {
                guard let e = try? memory.read(UInt64.self, at: GuestAddress(table + UInt64(i) * 8)), e & 1 != 0 else { continue }
                // A large page (PS at levels 2 and 3) maps memory, not a table.
                if (level == 2 || level == 3) && e & 0x80 != 0 { continue }
                frontier.append((e & mask, level - 1))
            }
        }
        return pages
    }

    /// The guest-physical pages the descriptor tables of `sregs` occupy (GDT, IDT, TSS, LDT), as far as they translate.
    package static func descriptorTablePages(memory: GuestMemory, sregs: SpecialRegisters) -> Set<UInt64> {
        let paging = PagingContext(sregs)
        var pages: Set<UInt64> = []
        func add(_ base: UInt64, _ limit: UInt64) {
            var v = base & ~0xfff
            let end = base &+ limit
            var n = 0
            while v <= end && n < 64 {
                if let t = try? memory.translate(v, paging: paging) { pages.insert(t.physical.rawValue & ~0xfff) }
                v &+= 0x1000; n += 1
            }
        }
        add(sregs.gdt.base, UInt64(sregs.gdt.limit))
        add(sregs.idt.base, UInt64(sregs.idt.limit))
        if !sregs.tr.unusable { add(sregs.tr.base, UInt64(sregs.tr.limit)) }
        if !sregs.ldt.unusable && sregs.ldt.present { add(sregs.ldt.base, UInt64(sregs.ldt.limit)) }
        return pages
    }

    /// Checks that every page of `pages` (guest-physical, page aligned) may be guarded:
    /// no page tables, no descriptor tables, no sized data symbol of the image on it.
    /// `virtualOf` maps a guest-physical page to the guest-virtual page the image's symbols use.
    package static func check(_ pages: [UInt64], memory: GuestMemory, sregs: SpecialRegisters,
                              symbols: SymbolTable, virtualOf: (UInt64) -> UInt64) throws(DMPRefusal) {
        let paging = PagingContext(sregs)
        guard let tables = pageTablePages(memory: memory, paging: paging, fiveLevel: sregs.cr4 & (1 << 12) != 0) else {
            throw DMPRefusal(.guard, "more than \(pageTableLimit) page-table pages: cannot prove the code page holds none")
        }
        let descriptors = descriptorTablePages(memory: memory, sregs: sregs)
        for p in pages {
            let hex = "0x" + String(p, radix: 16)
            if tables.contains(p) { throw DMPRefusal(.guard, "page \(hex) holds page tables") }
            if descriptors.contains(p) { throw DMPRefusal(.guard, "page \(hex) holds a descriptor table (GDT, IDT, TSS or LDT)") }
            let v = virtualOf(p)
            if let s = symbols.symbols.first(where: { !$0.isFunction && $0.size > 0 && $0.address < v &+ 0x1000 && $0.address &+ $0.size > v }) {
                throw DMPRefusal(.guard, "page \(hex) holds data (\(s.name))")
            }
        }
    }
}

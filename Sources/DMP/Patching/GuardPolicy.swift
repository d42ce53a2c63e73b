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

    /// Checks that every page of `pages` (guest-physical, page aligned) may be guarded: no page tables, no
    /// descriptor tables, and no writable data. With the image's section layout (`layout`), writable data is what
    /// overlaps a writable section (`SHF_WRITE`: `.data`, `.bss`, ...) or lies past the image's loaded segments on a
    /// page that holds part of them (memory the guest may use for anything); code and read-only data (`.rodata`: strings, tables, constants the
    /// guest never writes) may share a guarded page. Without a layout (no section headers), and for pages wholly
    /// outside the image, any sized data symbol of the image on the page refuses it, read-only or not.
    /// `virtualOf` maps a guest-physical page to the guest-virtual page the image's symbols use.
    package static func check(_ pages: [UInt64], memory: GuestMemory, sregs: SpecialRegisters, symbols: SymbolTable,
                              layout: ImageLayout? = nil, virtualOf: (UInt64) -> UInt64) throws(DMPRefusal) {
        for p in pages {
            if let why = dataProblem(page: p, symbols: symbols, layout: layout, virtualOf: virtualOf) {
                throw DMPRefusal(.guard, "page \(hex(p)) \(why)")
            }
        }
        let paging = PagingContext(sregs)
        guard let tables = pageTablePages(memory: memory, paging: paging, fiveLevel: sregs.cr4 & (1 << 12) != 0) else {
            throw DMPRefusal(.guard, "more than \(pageTableLimit) page-table pages: cannot prove the code page holds none")
        }
        let descriptors = descriptorTablePages(memory: memory, sregs: sregs)
        for p in pages {
            if tables.contains(p) { throw DMPRefusal(.guard, "page \(hex(p)) holds page tables") }
            if descriptors.contains(p) { throw DMPRefusal(.guard, "page \(hex(p)) holds a descriptor table (GDT, IDT, TSS or LDT)") }
        }
    }

    /// Why guest-physical page `page` holds data a guard must not cover (see ``check(_:memory:sregs:symbols:layout:virtualOf:)``),
    /// or `nil`.
    package static func dataProblem(page: UInt64, symbols: SymbolTable, layout: ImageLayout?,
                                    virtualOf: (UInt64) -> UInt64) -> String? {
        let v = virtualOf(page)
        // The sized data symbols on the page, to name what the data is.
        let data = symbols.symbols.filter { !$0.isFunction && $0.size > 0 && $0.address < v &+ 0x1000 && $0.address &+ $0.size > v }
        guard let layout else {
            return data.first.map { "holds data (\($0.name))" }
        }
        let pageRange = GuestRange(start: GuestAddress(page), size: 0x1000)
        if let s = layout.sections.first(where: { $0.writable && $0.range.overlaps(pageRange) }) {
            // Name a data symbol inside the section's part of the page, when there is one.
            let lo = v &+ (max(s.range.start.rawValue, page) &- page)
            let hi = v &+ (min(s.range.start.rawValue &+ s.range.size, page &+ 0x1000) &- page)
            let named = data.first { $0.address < hi && $0.address &+ $0.size > lo }
            return "holds writable data (section \(s.name.isEmpty ? "?" : s.name) at \(hex(s.range.start.rawValue))-\(hex(s.range.start.rawValue &+ s.range.size))"
                + (named.map { ", \($0.name)" } ?? "") + ")"
        }
        // The image's first and last pages may go on past its extent, where the guest's heap often starts:
        // refused. (Gaps between segments inside it are the linker's alignment.) A page wholly outside the image
        // (code the guest loaded or generated itself) is judged as without a layout.
        let lowest = layout.segments.map(\.start.rawValue).min() ?? 0
        let highest = layout.segments.map { $0.start.rawValue &+ $0.size }.max() ?? 0
        let covered = min(highest, page &+ 0x1000) > max(lowest, page) ? min(highest, page &+ 0x1000) &- max(lowest, page) : 0
        if covered == 0 { return data.first.map { "holds data (\($0.name))" } }
        if covered < 0x1000 { return "reaches past the image's loaded segments (memory the guest may use for data)" }
        return nil
    }
}

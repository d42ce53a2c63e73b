import Testing
import VMMKit

@Suite("Guest memory and page walk")
struct MemoryTests {
    @Test("checked reads and writes stay inside regions")
    func bounds() throws {
        let m = try GuestMemory(ranges: [
            (GuestRange(start: GuestAddress(0), size: 0x2000), false),
            (GuestRange(start: GuestAddress(0x10000), size: 0x1000), false),
        ])
        try m.write(UInt32(0xdeadbeef), at: GuestAddress(0x1ffc))
        #expect(try m.read(UInt32.self, at: GuestAddress(0x1ffc)) == 0xdeadbeef)
        #expect(throws: GuestMemoryError.partialBuffer(expected: 8, completed: 4)) {
            _ = try m.read(UInt64.self, at: GuestAddress(0x1ffc))
        }
        #expect(throws: GuestMemoryError.invalidAddress(GuestAddress(0x3000))) {
            try m.write(UInt8(1), at: GuestAddress(0x3000))
        }
        #expect(throws: GuestMemoryError.overflow(base: UInt64.max - 1, length: 4)) {
            _ = try m.read(UInt32.self, at: GuestAddress(UInt64.max - 1))
        }
        try m.write([1, 2, 3], at: GuestAddress(0x10ffd))
        #expect(try m.readBytes(at: GuestAddress(0x10ffd), count: 3) == [1, 2, 3])
        #expect(throws: GuestMemoryError.self) { try m.write([1, 2, 3, 4], at: GuestAddress(0x10ffd)) }
        #expect(try m.readBytes(at: GuestAddress(0x10ffd), count: 3) == [1, 2, 3], "a failed write changes nothing")
    }

    @Test("overlapping or unaligned regions are refused")
    func regions() {
        #expect(throws: GuestMemoryError.self) {
            _ = try GuestMemory(ranges: [(GuestRange(start: GuestAddress(0), size: 0x2000), false),
                                         (GuestRange(start: GuestAddress(0x1000), size: 0x1000), false)])
        }
        #expect(throws: GuestMemoryError.self) {
            _ = try GuestMemory(ranges: [(GuestRange(start: GuestAddress(0x10), size: 0x1000), false)])
        }
    }

    /// Builds page tables at 0x1000.. : PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000.
    func tables(pml4Flags: UInt64 = 0x7, pdptFlags: UInt64 = 0x7, pdFlags: UInt64 = 0x7, pteFlags: UInt64 = 0x7) throws -> GuestMemory {
        let m = try GuestMemory(size: 16 << 20)
        try m.write(0x2000 | pml4Flags, at: GuestAddress(0x1000))
        try m.write(0x3000 | pdptFlags, at: GuestAddress(0x2000))          // 0-1 GiB via PD
        try m.write(0x4000_0000 | 0x83 as UInt64, at: GuestAddress(0x2008)) // 1-2 GiB: 1 GiB page, supervisor, writable
        try m.write(0x4000 | pdFlags, at: GuestAddress(0x3000))            // 0-2 MiB via PT
        try m.write(0x0020_0000 | 0x81 as UInt64, at: GuestAddress(0x3008)) // 2-4 MiB: 2 MiB page, read-only, supervisor
        try m.write(0x0070_0000 | pteFlags, at: GuestAddress(0x4000 + 5 * 8)) // VA 0x5000 -> PA 0x700000
        try m.write(0x0080_0000 | 0x5 | (1 << 63) as UInt64, at: GuestAddress(0x4000 + 6 * 8)) // VA 0x6000: user, read-only, NX
        return m
    }

    @Test("4 KiB, 2 MiB and 1 GiB pages translate")
    func pageSizes() throws {
        let m = try tables()
        let p = PagingContext(cr3: 0x1000)
        let t4k = try m.translate(0x5123, paging: p)
        #expect(t4k.physical == GuestAddress(0x700123) && t4k.pageSize == 4096 && t4k.user && t4k.writable)
        let t2m = try m.translate(0x20_1234, paging: p)
        #expect(t2m.physical == GuestAddress(0x20_1234) && t2m.pageSize == 2 << 20 && !t2m.writable)
        let t1g = try m.translate(0x4012_3456, paging: p)
        #expect(t1g.physical == GuestAddress(0x4012_3456) && t1g.pageSize == 1 << 30)
    }

    @Test("not-present entries report their level")
    func notPresent() throws {
        let m = try tables()
        let p = PagingContext(cr3: 0x1000)
        #expect(throws: GuestMemoryError.pageNotPresent(virtual: 0x7000, level: 1)) { _ = try m.translate(0x7000, paging: p) }
        #expect(throws: GuestMemoryError.pageNotPresent(virtual: 0x80_0000_0000, level: 4)) { _ = try m.translate(0x80_0000_0000, paging: p) }
        #expect(throws: GuestMemoryError.pageNotPresent(virtual: 0x8000_0000, level: 3)) { _ = try m.translate(0x8000_0000, paging: p) }
        #expect(throws: GuestMemoryError.nonCanonical(virtual: 0x8000_0000_0000)) { _ = try m.translate(0x8000_0000_0000, paging: p) }
    }

    @Test("permission bits: user, write (with CR0.WP) and execute (with EFER.NXE)")
    func permissions() throws {
        let m = try tables()
        let p = PagingContext(cr3: 0x1000)
        // 2 MiB page: supervisor, read-only.
        #expect(throws: GuestMemoryError.protectionViolation(virtual: 0x20_0000, access: .user)) {
            _ = try m.translate(0x20_0000, paging: p, access: .user)
        }
        #expect(throws: GuestMemoryError.self) { _ = try m.translate(0x20_0000, paging: p, access: .write) }
        // CR0.WP clear: supervisor writes ignore R/W.
        _ = try m.translate(0x20_0000, paging: PagingContext(cr3: 0x1000, writeProtect: false), access: .write)
        // VA 0x6000: user read OK, user write not, execute not (NX) unless NXE is off.
        _ = try m.translate(0x6000, paging: p, access: .user)
        #expect(throws: GuestMemoryError.self) { _ = try m.translate(0x6000, paging: p, access: [.user, .write]) }
        #expect(throws: GuestMemoryError.self) { _ = try m.translate(0x6000, paging: p, access: .execute) }
        _ = try m.translate(0x6000, paging: PagingContext(cr3: 0x1000, noExecuteEnabled: false), access: .execute)
        // A user bit missing at an upper level denies user access below it.
        let m2 = try tables(pdFlags: 0x3)
        #expect(throws: GuestMemoryError.self) { _ = try m2.translate(0x5000, paging: p, access: .user) }
    }

    @Test("page tables outside guest memory are an error, not a crash")
    func tablesOutsideMemory() throws {
        let m = try GuestMemory(size: 1 << 20)
        try m.write(0x7fff_f000 | 0x7 as UInt64, at: GuestAddress(0x1000))
        #expect(throws: GuestMemoryError.invalidAddress(GuestAddress(0x7fff_f000))) {
            _ = try m.translate(0x1000, paging: PagingContext(cr3: 0x1000))
        }
    }
}

@Suite("Page walk modes")
struct PageWalkModeTests {
    @Test("the mode comes from CR0.PG, CR4.PAE, EFER.LMA and CR4.LA57; paging off is identity; others are refused")
    func modes() throws {
        let m = try GuestMemory(size: 1 << 20)
        var s = SpecialRegisters()
        s.cr0 = 0x11
        #expect(PagingContext(s).mode == .none)
        #expect(try m.translate(0x1234, paging: PagingContext(s)).physical == GuestAddress(0x1234))
        s.cr0 = 0x8000_0011
        #expect(PagingContext(s).mode == .legacy32)
        #expect(throws: GuestMemoryError.unsupportedPagingMode(.legacy32)) { _ = try m.translate(0, paging: PagingContext(s)) }
        s.cr4 = 0x20
        #expect(PagingContext(s).mode == .pae)
        s.efer = 0x500
        #expect(PagingContext(s).mode == .fourLevel)
        s.cr4 |= 1 << 12
        #expect(PagingContext(s).mode == .fiveLevel)
    }

    @Test("SMEP and SMAP forbid supervisor fetches and data accesses to user pages")
    func smepSmap() throws {
        let m = try GuestMemory(size: 16 << 20)
        try m.write(0x2000 | 0x7 as UInt64, at: GuestAddress(0x1000))
        try m.write(0x3000 | 0x7 as UInt64, at: GuestAddress(0x2000))
        try m.write(0x0 | 0x87 as UInt64, at: GuestAddress(0x3000))   // 0-2 MiB: user 2 MiB page
        let plain = PagingContext(cr3: 0x1000)
        _ = try m.translate(0x1000, paging: plain, access: .execute)
        let smep = PagingContext(cr3: 0x1000, smep: true)
        #expect(throws: GuestMemoryError.self) { _ = try m.translate(0x1000, paging: smep, access: .execute) }
        _ = try m.translate(0x1000, paging: smep, access: [.user, .execute])
        let smap = PagingContext(cr3: 0x1000, smap: true)
        #expect(throws: GuestMemoryError.self) { _ = try m.translate(0x1000, paging: smap) }
        _ = try m.translate(0x1000, paging: smap, access: .execute)
    }
}

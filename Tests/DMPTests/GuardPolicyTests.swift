@testable import DMP
import Testing
import VMMKit

/// ``GuardPolicy``: which guest pages DMP may guard. With the image's section layout, only writable data (and
/// memory past the image's end) keeps a page unguarded; without one, any sized data symbol does.
@Suite("Guard policy: writable sections, descriptor tables, page tables")
struct GuardPolicyTests {
    static func elf(_ name: String) throws -> ELFImage {
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3) // Tests/DMPTests/GuardPolicyTests.swift
        return try ELFImage(bytes: try ImageFile.read(parts.joined(separator: "/") + "/Guests/\(name).elf"))
    }

    /// The data problem of `page` in image `name` (identity-mapped, as the images are), with and without the layout.
    static func problem(_ name: String, page: UInt64, layout useLayout: Bool = true) throws -> String? {
        let e = try elf(name)
        let layout = try #require(ImageLayout(e))
        return GuardPolicy.dataProblem(page: page, symbols: e.symbols, layout: useLayout ? layout : nil, virtualOf: { $0 })
    }

    @Test("the section headers of a packed image: allocated sections with their flags, placed through the segments")
    func sections() throws {
        let layout = try #require(ImageLayout(try Self.elf("c-packed-cpl3")))
        #expect(layout.sections.map(\.name) == [".note.Xen", ".text", ".rodata", ".data", ".bss"])
        #expect(layout.sections.map(\.writable) == [false, false, false, true, true])
        #expect(layout.sections.map(\.executable) == [false, true, false, false, false])
        #expect(layout.sections[1].range.start == GuestAddress(0x10_0020))
        #expect(layout.sections[2].range.start == GuestAddress(0x10_0a20), ".rodata right after .text, on its page")
        #expect(layout.segments.count == 2)
    }

    @Test("an image without section headers has no layout (DMP keeps the symbol rule)")
    func noSectionHeaders() throws {
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)
        var bytes = try ImageFile.read(parts.joined(separator: "/") + "/Guests/c-packed-cpl3.elf")
        for i in 40..<48 { bytes[i] = 0 } // e_shoff
        let e = try ELFImage(bytes: bytes)
        #expect(e.sections == nil)
        #expect(ImageLayout(e) == nil)
        #expect(e.symbols.symbols.isEmpty)
    }

    @Test("code sharing its page with read-only data (.rodata: tables, strings) may be guarded; the symbol rule alone refuses it")
    func readOnlyDataShared() throws {
        #expect(try Self.problem("c-packed-cpl3", page: 0x10_0000) == nil)
        #expect(try Self.problem("c-packed-cpl3", page: 0x10_0000, layout: false) == "holds data (level_names)")
    }

    @Test("a page holding writable data is refused, naming the section and a variable on the page", arguments: [
        ("c-packed-cpl3-data", UInt64(0x10_0000), "holds writable data (section .data at 0x100a20-0x101ba0, out_hash)"),
        ("c-packed-cpl3", UInt64(0x10_1000), "holds writable data (section .data at 0x101b40-0x101b98, out_hash)"),
        ("c-boot-cpl3", UInt64(0x10_0000), "holds writable data (section .data at 0x1009f0-0x100a48, out_hash)"),
    ])
    func writableData(image: String, page: UInt64, reason: String) throws {
        #expect(try Self.problem(image, page: page) == reason)
    }

    @Test("our own images (code on pages of its own): every code page may be guarded with the layout, as without it",
          arguments: ["uart-cpl3", "c-uart-cpl3", "c-table-cpl3", "c-mmio-cpl3"])
    func codePagesOfTheirOwn(image: String) throws {
        let e = try Self.elf(image)
        let layout = try #require(ImageLayout(e))
        let text = try #require(layout.sections.first { $0.name == ".text" })
        var p = text.range.start.rawValue & ~0xfff
        while p < text.range.start.rawValue + text.range.size {
            #expect(GuardPolicy.dataProblem(page: p, symbols: e.symbols, layout: layout, virtualOf: { $0 }) == nil, "\(image) page \(p)")
            #expect(GuardPolicy.dataProblem(page: p, symbols: e.symbols, layout: nil, virtualOf: { $0 }) == nil, "\(image) page \(p)")
            p += 0x1000
        }
    }

    @Test("a page that goes on past the image's segments is refused; one wholly outside is judged by the symbol rule")
    func outsideTheImage() {
        let layout = ImageLayout(sections: [ImageSection(name: ".text", range: GuestRange(start: GuestAddress(0x20_0000), size: 0x1800),
                                                         writable: false, executable: true)],
                                 segments: [GuestRange(start: GuestAddress(0x20_0000), size: 0x1800)])
        let symbols = SymbolTable([GuestSymbol(name: "heap", address: 0x40_0000, size: 0x100, isFunction: false)])
        #expect(GuardPolicy.dataProblem(page: 0x20_0000, symbols: symbols, layout: layout, virtualOf: { $0 }) == nil)
        #expect(GuardPolicy.dataProblem(page: 0x20_1000, symbols: symbols, layout: layout, virtualOf: { $0 })
                == "reaches past the image's loaded segments (memory the guest may use for data)")
        #expect(GuardPolicy.dataProblem(page: 0x30_0000, symbols: symbols, layout: layout, virtualOf: { $0 }) == nil)
        #expect(GuardPolicy.dataProblem(page: 0x40_0000, symbols: symbols, layout: layout, virtualOf: { $0 }) == "holds data (heap)")
    }

    @Test("with a layout, page tables and descriptor tables are still refused; a read-only-data page passes")
    func tables() throws {
        let t = try TestPageTables()
        var s = SpecialRegisters()
        s.cr0 = 0x8000_0011; s.cr4 = 0x20; s.efer = 0x500; s.cr3 = TestPageTables.pml4
        s.gdt = DescriptorTable(base: 0x30_0100, limit: 0x37)
        let layout = ImageLayout(sections: [ImageSection(name: ".rodata", range: GuestRange(start: GuestAddress(0x10_0000), size: 0x40_0000),
                                                         writable: false, executable: false)],
                                 segments: [GuestRange(start: GuestAddress(0x10_0000), size: 0x40_0000)])
        func check(_ page: UInt64) -> String? {
            do throws(DMPRefusal) {
                try GuardPolicy.check([page], memory: t.memory, sregs: s, symbols: SymbolTable(), layout: layout, virtualOf: { $0 })
                return nil
            } catch { return error.reason }
        }
        #expect(check(0x20_0000) == nil)
        #expect(check(0x30_0000) == "page 0x300000 holds a descriptor table (GDT, IDT, TSS or LDT)")
        #expect(check(TestPageTables.pd) == "page 0x22000 holds page tables")
    }
}

extension GuardPolicyTests {
    @Test("a higher-half image: the segments' virtual addresses beside their physical ranges; its code page (the gap between the low entry's segment and the high one included) may be guarded, its data page not")
    func higherHalf() throws {
        let e = try Self.elf("c-higher-cpl3")
        let layout = try #require(ImageLayout(e))
        #expect(layout.segments.map(\.start.rawValue) == [0x10_0000, 0x10_00c0, 0x10_2000])
        #expect(layout.virtualAddresses == [0x10_0000, 0xffff_ffff_8010_00c0, 0xffff_ffff_8010_2000])
        let high: (UInt64) -> UInt64 = { $0 &+ 0xffff_ffff_8000_0000 }
        #expect(GuardPolicy.dataProblem(page: 0x10_0000, symbols: e.symbols, layout: layout, virtualOf: high) == nil)
        let data = GuardPolicy.dataProblem(page: 0x10_1000, symbols: e.symbols, layout: layout, virtualOf: high)
        #expect(data?.hasPrefix("holds writable data (section .data") == true && data?.hasSuffix(", out_hash)") == true, "\(data ?? "nil")")
    }
}

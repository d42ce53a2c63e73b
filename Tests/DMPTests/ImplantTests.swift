import DMP
import Testing
import VMMKit

/// Guest page tables written by hand: low 14 MiB identity-mapped with 2 MiB
/// pages, the paravirtual area (0xE00000–0xFFFFFF) with 4 KiB pages whose
/// flags each test sets, and the same first GiB again at 0xffffffff80000000
/// (a higher-half kernel's mapping).
struct TestPageTables {
    let memory: GuestMemory
    static let pml4: UInt64 = 0x20000, pdpt: UInt64 = 0x21000, pd: UInt64 = 0x22000, pt: UInt64 = 0x23000, highPDPT: UInt64 = 0x24000
    static let present: UInt64 = 1, writable: UInt64 = 2, user: UInt64 = 4, noExecute: UInt64 = 1 << 63
    static let higherHalf: UInt64 = 0xffff_ffff_8000_0000

    /// Everything present, writable, user and executable.
    init(lowFlags: UInt64 = present | writable | user) throws {
        memory = try GuestMemory(ranges: [(GuestRange(start: GuestAddress(0), size: 32 << 20), false)])
        let t = TestPageTables.self
        try memory.write(t.pdpt | 7, at: GuestAddress(t.pml4))
        try memory.write(t.highPDPT | 7, at: GuestAddress(t.pml4 + 511 * 8))
        try memory.write(t.pd | 7, at: GuestAddress(t.pdpt))
        try memory.write(t.pd | 7, at: GuestAddress(t.highPDPT + 510 * 8))
        for i in 0..<7 as Range<UInt64> { try memory.write(i << 21 | lowFlags | 0x80, at: GuestAddress(t.pd + i * 8)) }
        try memory.write(t.pt | 7, at: GuestAddress(t.pd + 7 * 8))
        for i in 0..<512 as Range<UInt64> { try setPage(0xE0_0000 + i * 4096, flags: t.present | t.writable | t.user) }
    }

    /// Maps the 4 KiB page at `virtual` (in the paravirtual area) to `target` with `flags`.
    func setPage(_ virtual: UInt64, flags: UInt64, target: UInt64? = nil) throws {
        let index = (virtual - 0xE0_0000) / 4096
        try memory.write((target ?? virtual) | flags, at: GuestAddress(TestPageTables.pt + index * 8))
    }

    func paging(smep: Bool = false, smap: Bool = false, writeProtect: Bool = true) -> PagingContext {
        PagingContext(cr3: TestPageTables.pml4, writeProtect: writeProtect, noExecuteEnabled: true, mode: .fourLevel, smep: smep, smap: smap)
    }

    func site(cpl: Int = 3, smep: Bool = false, smap: Bool = false, writeProtect: Bool = true, cr4: UInt64 = 0,
              virtual: UInt64 = 0x10_0000) -> ImplantSite {
        ImplantSite(virtualAddress: virtual, physicalAddress: GuestAddress(0x10_0000), cpl: cpl,
                    paging: paging(smep: smep, smap: smap, writeProtect: writeProtect), cr4: cr4)
    }
}

@Suite("Implant: bump allocation in separate code and data pages, the mapping check, owners of implanted code")
struct ImplantTests {
    let area = X86Layout.implantArea // 0xF00000, 1 MiB

    @Test("code grows up from the start, data down from the end, never in one page; contiguous code may span pages")
    func allocation() throws {
        let i = try Implant(area: area)
        let c1 = try i.allocateCode(10)
        let c2 = try i.allocateCode(20, alignment: 16)
        #expect(c1.start == area.start)
        #expect(c2.start == GuestAddress(area.start.rawValue + 16))
        let d1 = try i.allocateData(4)
        let d2 = try i.allocateData(8, alignment: 8)
        #expect(d1.start == GuestAddress(0xFF_F000), "the first data page is the area's last")
        #expect(d2.start == GuestAddress(0xFF_F008))
        let big = try i.allocateCode(5000, alignment: 64)
        #expect(big.start == GuestAddress(area.start.rawValue + 64))
        #expect(i.codePages == GuestRange(start: area.start, size: 0x2000), "5,064 bytes of code: two pages")
        let d3 = try i.allocateData(4090)
        #expect(d3.start == GuestAddress(0xFF_E000), "does not fit the first data page: a new one below it")
        #expect(i.dataPages == GuestRange(start: GuestAddress(0xFF_E000), size: 0x2000))
        #expect(!i.codePages.overlaps(i.dataPages))
    }

    @Test("a code range nothing was written to goes back when it is the latest allocation; the next allocation reuses it")
    func releaseCode() throws {
        let i = try Implant(area: area)
        let kept = try i.allocateCode(100)
        let refused = try i.allocateCode(5000, alignment: 64)
        #expect(i.codePages == GuestRange(start: area.start, size: 0x2000))
        #expect(!i.releaseCode(kept), "not the latest allocation: kept")
        #expect(i.releaseCode(refused))
        #expect(i.codePages == GuestRange(start: area.start, size: 0x1000), "the second page is no longer claimed")
        #expect(!i.releaseCode(refused), "given back once")
        let again = try i.allocateCode(5000, alignment: 64)
        #expect(again == refused, "the next plan gets the same range")
        // Data claimed below the code: a code range given back still never meets the data pages.
        #expect(i.releaseCode(again))
        let d = try i.allocateData(4)
        #expect(!i.codePages.overlaps(i.dataPages))
        #expect(d.start == GuestAddress(0xFF_F000))
        // The only allocation given back: nothing is claimed, and the next starts at the area's start.
        let j = try Implant(area: area)
        #expect(j.releaseCode(try j.allocateCode(16)))
        #expect(j.codePages.size == 0)
        #expect(try j.allocateCode(16).start == area.start)
        // Ranges that were never this implant's allocations are refused.
        #expect(!i.releaseCode(GuestRange(start: GuestAddress(0x10_0000), size: 16)))
        #expect(!i.releaseCode(GuestRange(start: area.start, size: 0)))
    }

    @Test("the plans' data probe is the first data page and allocates nothing")
    func dataProbe() throws {
        let i = try Implant(area: area)
        let before = i.dataPages
        #expect(i.dataProbe.start == GuestAddress(0xFF_F000))
        #expect(i.dataPages == before)
        let d = try i.allocateData(4)
        #expect(d.start == i.dataProbe.start, "the first chunk lands in the probed page")
    }

    @Test("a full implant, bad sizes and alignments and a bad area are refused with reasons")
    func allocationRefusals() throws {
        let small = try Implant(area: GuestRange(start: GuestAddress(0xF0_0000), size: 0x3000))
        _ = try small.allocateCode(4096)
        _ = try small.allocateData(4096)
        #expect(throws: DMPRefusal.self) { _ = try small.allocateCode(4097) }
        _ = try small.allocateCode(4096) // the middle page
        let full = #expect(throws: DMPRefusal.self) { _ = try small.allocateData(8) }
        #expect(full?.stage == .implant)
        #expect(full?.reason.hasPrefix("implant full") == true)
        #expect(throws: DMPRefusal.self) { _ = try small.allocateCode(1) }
        let i = try Implant(area: area)
        #expect(throws: DMPRefusal.self) { _ = try i.allocateCode(0) }
        #expect(throws: DMPRefusal.self) { _ = try i.allocateCode(8, alignment: 3) }
        #expect(throws: DMPRefusal.self) { _ = try i.allocateData(8, alignment: 8192) }
        #expect(throws: DMPRefusal.self) { _ = try Implant(area: GuestRange(start: GuestAddress(0xF0_0010), size: 0x2000)) }
        #expect(throws: DMPRefusal.self) { _ = try Implant(area: GuestRange(start: GuestAddress(0xF0_0000), size: 0x1000)) }
    }

    @Test("identity first: a guest that maps low memory user, writable and executable serves CPL3 and CPL0 sites")
    func identity() throws {
        let t = try TestPageTables()
        let i = try Implant(area: area)
        let code = try i.allocateCode(64), data = try i.allocateData(16)
        for site in [t.site(cpl: 3), t.site(cpl: 0)] {
            let p = try i.placement(for: site, code: code, data: [data], memory: t.memory)
            #expect(p.kind == .identity)
            #expect(p.virtualAddress(of: code.start) == code.start.rawValue)
        }
    }

    @Test("each missing permission is refused with the reason: NX code, supervisor code or data at CPL3, SMEP, SMAP, read-only data, not present, remapped, protection keys")
    func permissions() throws {
        let i = try Implant(area: area)
        let code = try i.allocateCode(64), data = try i.allocateData(16)
        let c = code.start.rawValue, d = data.start.rawValue
        typealias T = TestPageTables
        let rw = T.present | T.writable
        let cases: [(page: UInt64, flags: UInt64, target: UInt64?, site: (TestPageTables) -> ImplantSite, expect: String)] = [
            (c, rw | T.user | T.noExecute, nil, { $0.site(cpl: 3) }, "does not allow user execute"),
            (c, rw, nil, { $0.site(cpl: 3) }, "does not allow user execute"),
            (c, rw | T.user, nil, { $0.site(cpl: 0, smep: true) }, "CPL0 execute at 0xf00000: virtual address 0xf00000 does not allow execute"),
            (d, rw, nil, { $0.site(cpl: 3) }, "does not allow user write"),
            (d, T.present | T.user, nil, { $0.site(cpl: 3) }, "does not allow user write"),
            (d, T.present | T.writable | T.user, nil, { $0.site(cpl: 0, smap: true) }, "CPL0 write at 0xfff000: virtual address 0xfff000 does not allow write"),
            (d, 0, nil, { $0.site(cpl: 3) }, "0xfff000 not present at paging level 1"),
            (c, rw | T.user, 0x50_0000, { $0.site(cpl: 3) }, "0xf00000 maps 0x500000, not the page 0xf00000"),
        ]
        for k in cases {
            let t = try TestPageTables()
            try t.setPage(k.page, flags: k.flags, target: k.target)
            let r = #expect(throws: DMPRefusal.self) { _ = try i.placement(for: k.site(t), code: code, data: [data], memory: t.memory) }
            #expect(r?.stage == .implant)
            #expect(r?.reason.contains(k.expect) == true, "\(r?.reason ?? "")")
        }
        // Allowed: CPL0 fetching from a user page without SMEP; CPL0 writing read-only data with CR0.WP clear.
        let t = try TestPageTables()
        try t.setPage(d, flags: T.present | T.user)
        _ = try i.placement(for: t.site(cpl: 0, writeProtect: false), code: code, data: [data], memory: t.memory)
        let keys = #expect(throws: DMPRefusal.self) {
            _ = try i.placement(for: t.site(cpl: 3, cr4: 1 << 22), code: code, data: [data], memory: t.memory)
        }
        #expect(keys?.reason.contains("protection keys") == true)
        let outside = #expect(throws: DMPRefusal.self) {
            _ = try i.placement(for: t.site(), code: GuestRange(start: GuestAddress(0x10_0000), size: 8), data: [], memory: t.memory)
        }
        #expect(outside?.reason.contains("not inside the implant area") == true)
    }

    @Test("a higher-half site: identity is more than 2 GiB away, the site's own offset maps the implant")
    func higherHalf() throws {
        let t = try TestPageTables()
        let i = try Implant(area: area)
        let code = try i.allocateCode(64), data = try i.allocateData(16)
        let site = t.site(cpl: 0, virtual: TestPageTables.higherHalf + 0x10_0000)
        let p = try i.placement(for: site, code: code, data: [data], memory: t.memory)
        #expect(p.kind == .siteOffset)
        #expect(p.virtualAddress(of: code.start) == TestPageTables.higherHalf + code.start.rawValue)
        // Without the high mapping of the implant's page the site is refused, saying why for both.
        try t.memory.write(UInt64(0), at: GuestAddress(TestPageTables.highPDPT + 510 * 8))
        let r = #expect(throws: DMPRefusal.self) { _ = try i.placement(for: site, code: code, data: [data], memory: t.memory) }
        #expect(r?.reason.contains("identity: code at 0xf00000 is more than 2 GiB from the site") == true, "\(r?.reason ?? "")")
        #expect(r?.reason.contains("at the site's offset 0xffffffff80000000") == true)
    }

    @Test("RIPs inside registered implant code map back to their owner; others to none")
    func owners() throws {
        let i = try Implant(area: area)
        let identity = ImplantPlacement(offset: 0, kind: .identity)
        let a = try i.allocateCode(32), b = try i.allocateCode(100, alignment: 64)
        #expect(i.owner(ofInstructionPointer: a.start.rawValue) == nil, "nothing registered yet")
        i.registerOwner(7, code: b, placement: identity)
        i.registerOwner(3, code: a, placement: identity)
        #expect(i.owner(ofInstructionPointer: a.start.rawValue) == 3)
        #expect(i.owner(ofInstructionPointer: a.start.rawValue + 31) == 3)
        #expect(i.owner(ofInstructionPointer: b.start.rawValue) == 7)
        #expect(i.owner(ofInstructionPointer: b.start.rawValue + 99) == 7)
        #expect(i.owner(ofInstructionPointer: b.start.rawValue + 100) == nil)
        #expect(i.owner(ofInstructionPointer: a.start.rawValue + 32) == nil, "the alignment gap between a and b")
        #expect(i.owner(ofInstructionPointer: 0x10_0000) == nil)
        let high = ImplantPlacement(offset: TestPageTables.higherHalf, kind: .siteOffset)
        i.registerOwner(9, code: a, placement: high)
        #expect(i.owner(ofInstructionPointer: TestPageTables.higherHalf + a.start.rawValue + 4) == 9)
        #expect(i.owner(ofInstructionPointer: a.start.rawValue + 4) == 3)
        // An owner whose code was never written is forgotten (its range may go to another owner); the others stay.
        i.unregisterOwner(7, code: b, placement: identity)
        #expect(i.owner(ofInstructionPointer: b.start.rawValue) == nil)
        i.unregisterOwner(3, code: b, placement: identity)
        #expect(i.owner(ofInstructionPointer: a.start.rawValue) == 3, "owner 3 was registered for a, not b")
        i.registerOwner(8, code: b, placement: identity)
        #expect(i.owner(ofInstructionPointer: b.start.rawValue + 1) == 8)
    }
}

@testable import DMP
import Testing
import VMMKit

/// ``ImplantMapping``: the pages a patch reaches through the guest's tables, walked again later.
struct ImplantMappingTests {
    typealias T = TestPageTables

    /// A CPL3 patch's mapping: one code page, one data page, a two-page ring.
    func mapping(_ tables: TestPageTables) -> ImplantMapping {
        ImplantMapping(site: tables.site(cpl: 3), placement: ImplantPlacement(offset: 0, kind: .identity),
                       code: GuestRange(start: GuestAddress(0xF0_0010), size: 0x40),
                       data: [GuestRange(start: GuestAddress(0xFF_F000), size: 16), GuestRange(start: GuestAddress(0xFF_F010), size: 16)],
                       rings: [GuestRange(start: GuestAddress(0xE0_0000), size: 0x1040)])
    }

    @Test("each page once, with the access its use needs (code executed, data and rings written, user at CPL3)")
    func pages() throws {
        let m = mapping(try TestPageTables())
        #expect(m.pages.map(\.physical) == [0xF0_0000, 0xFF_F000, 0xE0_0000, 0xE0_1000])
        #expect(m.pages[0].access == [.execute, .user])
        #expect(m.pages.dropFirst().allSatisfy { $0.access == [.write, .user] })
        #expect(ImplantMapping.pageStarts(of: GuestRange(start: GuestAddress(0xFFF), size: 2)) == [0, 0x1000])
        #expect(ImplantMapping.pageStarts(of: GuestRange(start: GuestAddress(0x1000), size: 0)).isEmpty)
    }

    @Test("holds as recorded; any change the guest makes to a page's entry is found, with the reason",
          arguments: [
            (UInt64(0xF0_0000), T.writable | T.user, "not present"),                                 // code unmapped
            (UInt64(0xF0_0000), T.present | T.writable | T.user | T.noExecute, "does not allow"),    // code not executable
            (UInt64(0xF0_0000), T.present | T.writable, "does not allow"),                          // code supervisor-only
            (UInt64(0xFF_F000), T.present | T.user, "does not allow"),                              // data read-only
            (UInt64(0xE0_1000), T.writable | T.user, "not present"),                                // the ring's second page
          ])
    func changes(page: UInt64, flags: UInt64, reason: String) throws {
        let tables = try TestPageTables()
        let m = mapping(tables)
        #expect(m.problem(in: tables.memory) == nil)
        try tables.setPage(page, flags: flags)
        let why = m.problem(in: tables.memory)
        #expect(why?.contains(reason) == true, "\(why ?? "nil")")
    }

    @Test("a page remapped to another frame is found")
    func remapped() throws {
        let tables = try TestPageTables()
        let m = mapping(tables)
        try tables.setPage(0xF0_0000, flags: T.present | T.writable | T.user, target: 0x50_0000)
        #expect(m.problem(in: tables.memory) == "0xf00000 maps 0x500000, not the page 0xf00000")
    }
}

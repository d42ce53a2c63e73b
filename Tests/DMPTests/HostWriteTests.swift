import DMP
import Logging
import Testing
import VMMKit
import VMMKitTesting

// Host-side writes into guarded pages (a device's DMA, reported from under the device's lock) wait for DMP's
// periodic pass. A guest that points a device's queue at a guarded page makes a write per request: the pending list
// holds one per span of pages, not one per write.

@Suite("DMP: host-side writes into guarded pages")
struct HostWriteTests {
    @Test("repeated host writes into the same pages are kept once per span of pages until the periodic pass")
    func hostWritesKeptOncePerPageSpan() throws {
        let mock = MockHypervisor()
        let vm = try VirtualMachine(backend: mock, configuration: VMConfiguration(memorySize: 32 << 20))
        var logger = Logger(label: "test.dmp.hostwrites")
        logger.logLevel = .critical
        let dmp = DMPMiddleware.install(on: vm, rings: nil, configuration: DMPConfiguration(), logger: logger)
        let page: UInt64 = 0x20_0000
        // A doorbell-style queue in a guarded page: a completion and its sequence word per request, at offsets
        // that move through the page.
        for k in 0..<20_000 as Range<UInt64> {
            let at = page + (k * 8) % 0x1000
            dmp.guardedWrite(GuardedWrite(range: GuestRange(start: GuestAddress(at), size: 4), source: .host), context: nil)
            dmp.guardedWrite(GuardedWrite(range: GuestRange(start: GuestAddress(at + 4), size: 4), source: .host), context: nil)
        }
        // A write across the page's end (two pages) and one into the next page are spans of their own.
        dmp.guardedWrite(GuardedWrite(range: GuestRange(start: GuestAddress(page + 0xffe), size: 4), source: .host), context: nil)
        dmp.guardedWrite(GuardedWrite(range: GuestRange(start: GuestAddress(page + 0x1010), size: 8), source: .host), context: nil)
        dmp.guardedWrite(GuardedWrite(range: GuestRange(start: GuestAddress(page + 0x1ff8), size: 8), source: .host), context: nil)
        let pending = dmp.testSeam.pendingHostWrites
        #expect(pending.count == 3, "\(pending)")
        #expect(pending.map(\.start.rawValue) == [page, page + 0xffe, page + 0x1010])
    }
}

import DMP
import Testing
import VMMKit

/// C guests from the compiler-flag sweep (the committed C guests' sources built with flags nobody here chose),
/// committed before the DMP work they showed was needed.
extension KVMTests {
    /// A warm-up of 100 batches: every store exits often enough to join the first plan as a sibling.
    @Test("c-doorbell-cpl3-unroll (-O3 -funroll-loops): DOORBELL stores back to back, where one store's exit RIP is the next one's start, all join db_run's copy as siblings; every store served, steady exits cut, same output")
    func dmpBackToBackStoresJoinAsSiblings() throws {
        let (off, on) = try doorbellRuns("c-doorbell-cpl3-unroll", commandLine: "iters=4096 warmup=1600")
        try expectEveryDoorbellStoreServed(on)
        for s in on.report where s.location.hasPrefix("db_run+") { #expect(s.hitsServed > 100, "\(s)") }
        try on.expectSameOutput(as: off, steadyExitsCutBy: 20, kicksExcluded: true)
    }

    @Test("c-doorbell-cpl3-unroll with siblings off: every store, back to back or not, gets hot in the copy on its own and joins by a rebuild; steady exits cut, same output")
    func dmpBackToBackStoresJoinByRebuilds() throws {
        let (off, on) = try doorbellRuns("c-doorbell-cpl3-unroll", commandLine: "iters=4096 warmup=1600", planSiblings: false)
        try expectEveryDoorbellStoreServed(on)
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10, kicksExcluded: true)
    }

    @Test("c-doorbell-cpl3-ubuntu-lto (-O2 -flto, distribution defaults): db_run's copy, entered through a 5-byte instruction that crosses a page boundary, is rebuilt for the STATUS read that gets hot later (the write-time check takes that entry back across the boundary); both sites served, same output")
    func dmpRebuildOverEntryAcrossPages() throws {
        let (off, on) = try doorbellRuns("c-doorbell-cpl3-ubuntu-lto", commandLine: "iters=4096")
        let text = DMPReport.text(on.report)
        let status = try #require(on.report.first { $0.location.hasPrefix("db_run+") && $0.site.kind == .mmio && $0.site.direction == .read },
                                  "\(text)")
        #expect(status.state == .patched && status.refusal == nil, "\(text)")
        #expect(status.strategy.hasPrefix("function copy of db_run") && status.strategy.hasSuffix("(rebuilt 1x)"), "\(text)")
        for s in on.report where s.location.hasPrefix("db_run+") { #expect(s.hitsServed > 100, "\(s)") }
        try on.expectSameOutput(as: off, steadyExitsCutBy: 20, kicksExcluded: true)
    }

    @Test("c-selfmod-cpl3 (short of the target in every variant of the flag sweep): each of its three rewrites of its code page undoes the copies there; a site whose patch served a verification window's accesses before is patched again as soon as it is hot again, no back-off: over 90% of the steady exits gone at the default 200 lines, same output")
    func dmpRewrittenPagePaidPatchesReturn() throws {
        let off = try DMPLibraryRun("c-selfmod-cpl3", commandLine: "iters=200", dmp: false)
        let on = try DMPLibraryRun("c-selfmod-cpl3", commandLine: "iters=200", pollerIdle: 1_000_000_000)
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop)
        let text = DMPReport.text(on.report)
        let sites = on.report.filter { $0.location.hasPrefix("early_") }
        #expect(sites.count == 4, "\(text)")
        for s in sites {
            // Patched again after the last rewrite (its undo reason cleared by the new patch).
            #expect(s.state == .patched && s.refusal == nil && s.hitsServed > 0, "\(text)")
        }
        // With the back-off after each rewrite (64, 128, 256 exits of each site) 1,808 of 11,881 were left.
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
    }

    /// A doorbell guest without and with DMP. Verification off, a poller that does not sleep and a long append
    /// wait: these tests are about what the plan serves (synchronous appends under load are the verifier's,
    /// VerifyKVMTests).
    private func doorbellRuns(_ image: String, commandLine: String,
                              planSiblings: Bool = true) throws -> (off: DMPLibraryRun, on: DMPLibraryRun) {
        let off = try DMPLibraryRun(image, commandLine: commandLine, dmp: false)
        let on = try DMPLibraryRun(image, commandLine: commandLine, pollerIdle: 1_000_000_000) {
            $0.planSiblings = planSiblings
            $0.synchronousWaitLimit = 1 << 20
            $0.verify = false
        }
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop)
        return (off, on)
    }

    /// Sixteen store instructions, each patched in db_run's copy: the loop's entry store, seven behind the
    /// Duff's-device entry, eight in the unrolled loop (two of them end where the next store begins); no other
    /// store's exits charged to one as its fallbacks.
    private func expectEveryDoorbellStoreServed(_ on: DMPLibraryRun) throws {
        let text = DMPReport.text(on.report)
        let doorbell = StandardDevices.doorbellBase + DoorbellDevice.doorbellOffset
        let stores = on.report.filter { $0.location.hasPrefix("db_run+") && $0.site.kind == .mmio && $0.site.address == doorbell }
        #expect(Set(stores.compactMap(\.instructionAddress)).count == 16, "\(text)")
        for s in stores {
            #expect(s.state == .patched && s.strategy.hasPrefix("function copy of db_run"), "\(text)")
            #expect(s.exitsWhilePatched < 8, "\(text)")
        }
    }
}

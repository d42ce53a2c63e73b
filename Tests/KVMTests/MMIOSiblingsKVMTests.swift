import DMP
import Testing
import VMMKit

extension KVMTests {
    @Test("MMIO sites hot at different times: a second DOORBELL store gets hot inside db_ring's copy; the rebuilt copy serves both, output identical to DMP off, steady exits cut")
    func dmpMMIOSiblingJoinsCopy() throws {
        let off = try DMPLibraryRun("mmio-siblings-cpl3", commandLine: "iters=8192", dmp: false)
        // Each site planned alone, so the second store can join only by a rebuild (on a slow run both stores may
        // be hot by the first plan, which would serve them together); a wait bound longer than a scheduler time
        // slice (2^20 iterations, ~25 ms) and a poller that does not sleep when the vCPU is off its CPU a while, so
        // a slow run (a loaded machine, a sanitizer build) makes appends wait rather than kick (the kicks left are
        // not counted in the exit bound below: each is a served append); verification off: on a host loaded enough,
        // it rightly undoes synchronous appends (VerifyKVMTests), and this test is about the rebuild.
        let on = try DMPLibraryRun("mmio-siblings-cpl3", commandLine: "iters=8192", pollerIdle: 1_000_000_000) {
            $0.planSiblings = false
            $0.synchronousWaitLimit = 1 << 20
            $0.verify = false
        }
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop)
        #expect(off.text.hasSuffix("mmio line 2000 hash 9d3dc820\ndone\n"), "\(off.text.suffix(80))")
        let text = DMPReport.text(on.report)
        let sites = on.report.filter { $0.location.hasPrefix("db_ring+") }
        // Two instructions, one register: the path-0 store and the path-1 store of the DOORBELL register.
        #expect(sites.count == 2, "\(text)")
        #expect(Set(sites.compactMap(\.instructionAddress)).count == 2, "\(text)")
        for s in sites {
            #expect(s.site.kind == .mmio && s.site.address == StandardDevices.doorbellBase + DoorbellDevice.doorbellOffset, "\(s)")
            #expect(s.state == .patched, "\(text)")
            // One copy: the one made for the path-0 store, rebuilt once when the path-1 store got hot inside it.
            #expect(s.strategy.hasPrefix("function copy of db_ring") && s.strategy.hasSuffix("(rebuilt 1x)"), "\(text)")
            #expect(s.userMode)
            // Path 1 runs for a quarter of the requests (half of the second half); path 0 for the rest.
            #expect(s.hitsServed > 1000, "\(text)")
        }
        try on.expectSameOutput(as: off, steadyExitsCutBy: 20, kicksExcluded: true)
    }
}

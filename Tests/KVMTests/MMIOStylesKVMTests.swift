import DMP
import Testing
import VMMKit

/// C guests from the MMIO style sweep (`Guests/c-mmio-mixed-cpl3.c`), committed before the DMP work they showed
/// was needed.
extension KVMTests {
    @Test("a hot function holding a live instruction stub is copied with the stub folded in (c-mmio-mixed-cpl3: the 9-byte DOORBELL store's stub, then the UART's 1-byte in/out in the same loop): every site served in the copy, over 90% of the steady exits gone, same output")
    func dmpStubFoldedIntoCopy() throws {
        let off = try DMPLibraryRun("c-mmio-mixed-cpl3", commandLine: "iters=4096", dmp: false)
        // Verification off: this is about what the plan serves (a synchronous append under load is the verifier's).
        let on = try DMPLibraryRun("c-mmio-mixed-cpl3", commandLine: "iters=4096") { $0.verify = false }
        #expect(on.stop == .guestExit(status: 0))
        let bell = try #require(on.report.first { $0.location == "run+0x84" }, "\(on.report.map(\.description))")
        let lsr = try #require(on.report.first { $0.location == "run+0xa3" }, "\(on.report.map(\.description))")
        let thr = try #require(on.report.first { $0.location == "run+0xaf" }, "\(on.report.map(\.description))")
        // The DOORBELL store got hot first (an instruction stub); the copy made for the UART's sites serves it inline.
        for s in [bell, lsr, thr] {
            #expect(s.state == .patched && s.strategy.hasPrefix("function copy of run"), "\(s)")
            #expect(s.hitsServed > 2_000, "\(s)")
        }
        #expect(bell.strategy == lsr.strategy && lsr.strategy == thr.strategy, "one copy serves all three")
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
    }
}

import DMP
import Testing
import VMMKit

extension KVMTests {
    @Test("a site that gets hot inside an already copied function: the copy is rebuilt with it, the old sites stay served, the output is DMP off's",
          arguments: [64, 16])
    func dmpRebuildsCopy(threshold: Int) throws {
        let off = try DMPGuestRun("copy-rebuild-cpl3", commandLine: "lines=400", dmp: nil)
        let offStop = try off.run()
        let on = try DMPGuestRun("copy-rebuild-cpl3", commandLine: "lines=400", dmp: DMPGuestRun.configuration(threshold: threshold))
        let onStop = try on.run()
        #expect(offStop == .guestExit(status: 0) && onStop == offStop)
        #expect(on.output == off.output)
        #expect(off.output.hasSuffix("rebuild line 018f\ndone\n"))
        let report = on.dmp?.report() ?? []
        let text = DMPReport.text(report)
        let sites = on.sites(in: "putc_delay")
        #expect(Set(sites.map(\.site.address)) == [0x3fd, 0x3f8, 0x80], "\(text)")
        for s in sites {
            #expect(s.state == .patched, "\(text)")
            #expect(s.strategy.hasPrefix("function copy of putc_delay") && s.strategy.hasSuffix("(rebuilt 1x)"), "\(text)")
            #expect(s.userMode)
        }
        // The delay write only runs in the second half: it became hot inside the copy and is served by the rebuilt one.
        let delay = try #require(sites.first { $0.site.address == 0x80 }, "\(text)")
        #expect(delay.instruction == "out 0x80, al" && delay.location.hasPrefix("putc_delay+"), "\(text)")
        #expect(delay.hitsServed > 2000, "\(text)")
        // The line-status and THR sites were served before the rebuild and after it, by the same counters.
        for s in sites where s.site.address != 0x80 { #expect(s.hitsServed > 5000, "\(text)") }
        #expect(on.decisions.reasons("refused").isEmpty, "\(on.decisions.reasons("refused"))")
        #expect(on.decisions.reasons("undone").isEmpty, "\(on.decisions.reasons("undone"))")
        #expect(on.vm.statistics()[.io] ?? 0 < 1500, "the steady phase runs in the copies")
    }
}

import DMP
import Testing
import VMMKit

// Issue 6, "Bad input": a guest that unmaps or remaps the implant while patched code is live.
// Page-table writes do not exit: DMP walks each patch's implant mapping again on fallback exits,
// on exits at patched sites, whenever a site becomes hot and every 20 ms, and undoes a patch
// whose mapping changed; a re-plan is refused by the mapping check at plan time.

extension KVMTests {
    @Test("a guest that unmaps or remaps the implant under live patches: output and status as without DMP, the patches undone with the reason, none re-made",
          arguments: [3, 4, 5, 6])
    /// `scribble` (Guests/uart-modes-cpl3.s): 3, the implant's code remapped to other frames holding a copy;
    /// 4, unmapped; 5, mapped without execute; 6, mapped supervisor-only.
    func dmpGuestRemapsImplant(scribble: Int) throws {
        let (_, on, stop) = try offAndOn("uart-modes-cpl3", "lines=20 rounds=3 scribble=\(scribble)")
        #expect(stop == .guestExit(status: 0))
        let lines = on.output.split(separator: "\n")
        #expect(lines.last == "done" && lines.count == 3 * (20 + 2) + 1, "\(on.output.suffix(300))")
        let report = DMPReport.text(on.dmp?.report() ?? [])
        let putc = on.sites(in: "uart_putc")
        // Patched in the first round (served in the guest), undone once the mapping changed ...
        #expect(putc.count == 2 && putc.allSatisfy { $0.hotToPatchedNanoseconds != nil && $0.hitsServed > 0 }, "\(report)")
        let undone = on.decisions.reasons("undone")
        #expect(undone.contains { $0.contains("no longer map the implant as when it was patched") }, "\(undone)\n\(report)")
        // ... and never in place again: a re-plan walks the page tables and refuses.
        #expect(!putc.contains { $0.state == .patched }, "\(report)")
        for s in putc where s.state == .refused {
            #expect(s.refusal?.stage == .implant, "\(report)")
        }
    }
}

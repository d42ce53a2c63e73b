import DMP
import Testing
import VMMKit

/// C guests in the idioms of drivers and runtimes nobody here wrote (an embedded printf library; the scratch sweep
/// of /work/scratch/realdrv also imitated xv6, Zephyr, U-Boot, Linux's early console, SeaBIOS, virtio-mmio and
/// NVMe), committed before the DMP work they showed was needed.
extension KVMTests {
    /// `sink_out` is reached only through `_out_fct`'s tail jump through the callback pointer: a 3-byte first
    /// instruction, and the dead padding below it already holds `_out_char`'s entry. Its own copy's redirects
    /// after the poll loop (the THR write's path) do not lead back into the poll; the `mov edx, 0x3fd` before the
    /// loop does, on the function's next call. Without it the LSR poll had no way in, DMP promoted the calls on
    /// the stack (`_ntoa_long`'s and `_vsnprintf`'s `call` of `_out_fct`, never of `sink_out`), and a third of
    /// the steady exits stayed.
    @Test("c-printf-cpl3 (mpaland-style printf, gcc -O2): sink_out's LSR poll, which the redirects after its loop do not lead to, is entered before its loop; both its sites served by its own copy, over 90% of the steady exits gone, same output")
    func dmpPrintfCallbackEnteredBeforeItsLoop() throws {
        let off = try DMPLibraryRun("c-printf-cpl3", commandLine: "iters=300", dmp: false)
        let on = try DMPLibraryRun("c-printf-cpl3", commandLine: "iters=300")
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop)
        let text = DMPReport.text(on.report)
        let sites = on.report.filter { $0.location.hasPrefix("sink_out+") }
        #expect(sites.count == 2, "\(text)")
        for s in sites {
            #expect(s.state == .patched && s.strategy.hasPrefix("function copy of sink_out") && s.hitsServed > 1000, "\(text)")
        }
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
    }
}

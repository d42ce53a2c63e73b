import DMP
import Testing
import VMMKit

/// The C guests written in styles the DMP developers do not use (`Guests/c-table-cpl3.c`, `Guests/c-mmio-cpl3.c`:
/// runtimes of their own, a table-driven 8250 behind `switch` jump tables, a sink table of callbacks, an
/// out-of-line `noinline` port write reached by tail calls, Linux-style `readl`/`writel`, a doorbell loop
/// unrolled into 16 stores). Committed before DMP work on them; DMP must never change what they print.
extension KVMTests {
    @Test("DMP on the outside-style C guests: output and exit status identical to DMP off", arguments: [
        ("c-table-cpl3", "iters=400"), ("c-mmio-cpl3", "iters=4096"),
    ])
    func dmpOutsideCGuestsSameOutput(name: String, commandLine: String) throws {
        let off = try DMPLibraryRun(name, commandLine: commandLine, dmp: false)
        let on = try DMPLibraryRun(name, commandLine: commandLine)
        #expect(off.stop == .guestExit(status: 0))
        #expect(on.stop == off.stop)
        #expect(on.lines == off.lines)
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum"))
        #expect(!on.report.isEmpty, "DMP saw hot sites")
    }
}

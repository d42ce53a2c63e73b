import Testing
import VMMKit
import DMP

/// DMP on the C UART guest built at -Os and -O1 (Guests/README.md): the port accessors
/// `io_serial_in_slow`/`io_serial_out_slow` are tiny out-of-line functions reached only through
/// the port's function pointers, whose first instruction is 2 bytes, with no dead padding in reach.
extension KVMTests {
    @Test("c-uart-cpl3 at -Os and -O1: DMP on prints what DMP off prints, with the same checksum and status; every hot accessor site is served or refused with a reason",
          arguments: ["c-uart-cpl3-Os", "c-uart-cpl3-O1"])
    func dmpCUartIndirectAccessors(image: String) throws {
        let off = try DMPLibraryRun(image, commandLine: "iters=120", dmp: false)
        let on = try DMPLibraryRun(image, commandLine: "iters=120")
        #expect(on.stop == .guestExit(status: 0) && off.stop == on.stop)
        #expect(on.lines == off.lines)
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum"))
        let accessors = on.report.filter { $0.location.hasPrefix("io_serial_in_slow+") || $0.location.hasPrefix("io_serial_out_slow+") }
        #expect(accessors.count == 4, "\(on.report.map(\.description))")
        for s in accessors {
            #expect(s.state == .patched || (s.state == .refused && s.refusal != nil), "\(s)")
        }
    }
}

extension KVMTests {
    @Test("c-uart-cpl3 at -Os and -O1 before call promotion: the accessors' `in al, dx` and `out dx, al` cannot be entered (2-byte entry, no direct call, no dead padding) and are refused as such")
    func dmpCUartIndirectAccessorsRefused() throws {
        for image in ["c-uart-cpl3-Os", "c-uart-cpl3-O1"] {
            let on = try DMPLibraryRun(image, commandLine: "iters=120")
            let dx = on.report.filter { $0.instruction == "in al, dx" || $0.instruction == "out dx, al" }
            #expect(dx.count == 2, "\(image): \(on.report.map(\.description))")
            for s in dx {
                #expect(s.state == .refused && s.refusal?.reason.contains("no entry into the copy") == true, "\(image): \(s)")
            }
        }
    }
}

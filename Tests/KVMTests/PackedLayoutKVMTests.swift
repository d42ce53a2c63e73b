import DMP
import Testing
import VMMKit

/// Guests linked packed (`Guests/c-packed-cpl3.c`, one object and two linker scripts): code, read-only data,
/// data and bss one after the other, no page alignment, as small kernels outside this repository are linked.
/// DMP guards a code page that shares its page with read-only data (the section headers say the guest never
/// writes it) and refuses one that holds writable data.
extension KVMTests {
    @Test("DMP on a packed image whose hot code shares its page with .rodata: both log_drain sites served, over 90% of the steady exits gone, same output")
    func dmpPackedReadOnlyData() throws {
        let off = try DMPLibraryRun("c-packed-cpl3", commandLine: "iters=400", dmp: false)
        let on = try DMPLibraryRun("c-packed-cpl3", commandLine: "iters=400")
        #expect(on.stop == .guestExit(status: 0) && off.stop == on.stop)
        let sites = on.report.filter { $0.location.hasPrefix("log_drain+") }
        #expect(Set(sites.map(\.site.address)) == [0x3f8, 0x3fd], "\(on.report.map(\.description))")
        #expect(sites.allSatisfy { $0.state == .patched && $0.hitsServed > 1000 }, "\(sites.map(\.description))")
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
    }

    @Test("DMP on packed images it must not guard: written data on the hot code's page (section headers), or any data symbol there (no section headers): refused with the reason, same output", arguments: [
        ("c-packed-cpl3-data", true, "page 0x100000 holds writable data (section .data at 0x100a20-0x101ba0, out_hash)"),
        ("c-packed-cpl3", false, "page 0x100000 holds data (level_names)"),
    ])
    func dmpPackedRefused(image: String, sectionHeaders: Bool, reason: String) throws {
        let off = try DMPLibraryRun(image, commandLine: "iters=200", dmp: false)
        let on = try DMPLibraryRun(image, commandLine: "iters=200") { if !sectionHeaders { $0.imageLayout = nil } }
        #expect(on.stop == .guestExit(status: 0) && off.stop == on.stop)
        #expect(on.lines == off.lines)
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum"))
        let sites = on.report.filter { $0.location.hasPrefix("log_drain+") }
        #expect(sites.count == 2, "\(on.report.map(\.description))")
        for s in sites {
            #expect(s.state == .refused && s.hitsServed == 0, "\(s)")
            #expect(s.refusal == DMPRefusal(.guard, reason), "\(s)")
        }
    }
}

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
        // The UART's transmit register is a ring's target: its grant announced a producer before the refusal, which
        // took it back. No stub ran, so the guest's own writes to it are no producer fallbacks (they were, all of them).
        #expect(on.ringFallbacks == 0, "\(on.ringFallbacks) producer fallbacks, \(on.pollerSleeps) poller sleeps")
    }
}

/// A higher-half kernel (`Guests/c-higher-cpl3.c`): code linked at 0xffffffff80100000 and loaded at 1 MiB. DMP reads
/// the image's code at the segments' virtual addresses and places the implant through the guest's own high mapping
/// (the site's virtual-minus-physical offset), with the low identity map kept or dropped.
extension KVMTests {
    @Test("DMP on a higher-half kernel: both log_drain sites served by a function copy, over 90% of the steady exits gone, same output", arguments: [
        "iters=400", "iters=400 lowmap=0",
    ])
    func dmpHigherHalf(commandLine: String) throws {
        let off = try DMPLibraryRun("c-higher-cpl3", commandLine: commandLine, dmp: false)
        let on = try DMPLibraryRun("c-higher-cpl3", commandLine: commandLine)
        #expect(on.stop == .guestExit(status: 0) && off.stop == on.stop)
        let sites = on.report.filter { $0.location.hasPrefix("log_drain+") }
        #expect(Set(sites.map(\.site.address)) == [0x3f8, 0x3fd], "\(on.report.map(\.description))")
        #expect(sites.allSatisfy { $0.state == .patched && $0.hitsServed > 1000 && $0.strategy.hasPrefix("function copy of log_drain") },
                "\(sites.map(\.description))")
        #expect(sites.allSatisfy { ($0.instructionAddress ?? 0) >= 0xffff_ffff_8010_0000 && ($0.physicalAddress?.rawValue ?? 0) < 0x20_0000 },
                "\(sites.map(\.description))")
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
    }

    @Test("DMP on a higher-half kernel without the image's layout (code assumed at its physical addresses): refused with the reason, same output")
    func dmpHigherHalfWithoutLayout() throws {
        let off = try DMPLibraryRun("c-higher-cpl3", commandLine: "iters=200", dmp: false)
        let on = try DMPLibraryRun("c-higher-cpl3", commandLine: "iters=200") { $0.imageLayout = nil }
        #expect(on.stop == .guestExit(status: 0) && off.stop == on.stop)
        #expect(on.lines == off.lines)
        let sites = on.report.filter { $0.location.hasPrefix("log_drain+") }
        #expect(sites.count == 2 && sites.allSatisfy { $0.state == .refused && $0.hitsServed == 0 }, "\(on.report.map(\.description))")
        #expect(sites.allSatisfy { $0.refusal?.reason.contains("the bytes of log_drain are not in the image's code") == true },
                "\(sites.map(\.description))")
    }
}

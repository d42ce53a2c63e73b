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
        let on = try DMPLibraryRun("c-mmio-mixed-cpl3", commandLine: "iters=4096", pollerIdle: 1_000_000_000) { $0.verify = false }
        #expect(on.stop == .guestExit(status: 0))
        let bell = try #require(on.report.first { $0.location == "run+0x7b" }, "\(on.report.map(\.description))")
        let lsr = try #require(on.report.first { $0.location == "run+0xa3" }, "\(on.report.map(\.description))")
        let thr = try #require(on.report.first { $0.location == "run+0xae" }, "\(on.report.map(\.description))")
        // The DOORBELL store got hot first (an instruction stub); the copy made for the UART's sites serves it inline.
        for s in [bell, lsr, thr] {
            #expect(s.state == .patched && s.strategy.hasPrefix("function copy of run"), "\(s)")
            #expect(s.hitsServed > 2_000, "\(s)")
        }
        #expect(bell.strategy == lsr.strategy && lsr.strategy == thr.strategy, "one copy serves all three")
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10, kicksExcluded: true)
    }
}

extension KVMTests {
    @Test("c-mmio-widths-cpl3: STATUS read as a byte, a word, a dword and a qword is served from the shared slot at every width; the byte DOORBELL store and the reserved registers' stores are refused (the device has no fast path for them), same output")
    func dmpStatusAtEveryWidth() throws {
        let off = try DMPLibraryRun("c-mmio-widths-cpl3", commandLine: "iters=8192", dmp: false)
        let on = try DMPLibraryRun("c-mmio-widths-cpl3", commandLine: "iters=8192", pollerIdle: 1_000_000_000) { $0.verify = false }
        #expect(on.stop == .guestExit(status: 0))
        let status = on.report.filter { $0.site.kind == .mmio && $0.site.address == 0xd000_0004 }
        for size in [1, 2, 4, 8] {
            let s = status.filter { Int($0.site.size) == size }
            #expect(!s.isEmpty && s.allSatisfy { $0.state == .patched && $0.hitsServed > 50 }, "STATUS read\(size): \(s.map(\.description))")
        }
        let refused = on.report.filter { $0.state == .refused }
        #expect(refused.allSatisfy { $0.site.size != 4 || ($0.site.address >= 0xd000_0020 && $0.site.address < 0xd000_0030) },
                "\(refused.map(\.description))")
        #expect(refused.allSatisfy { $0.refusal?.reason.contains("offers no fast path") == true }, "\(refused.map(\.description))")
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10, kicksExcluded: true)
    }

    @Test("c-mmio-poll-cpl3: the `orl` on DOORBELL is refused as a read-modify-write at both of its exits (its read and its write), every polling loop's STATUS read and the plain DOORBELL stores are served, same output")
    func dmpReadModifyWriteRefused() throws {
        let off = try DMPLibraryRun("c-mmio-poll-cpl3", commandLine: "iters=8192", dmp: false)
        let on = try DMPLibraryRun("c-mmio-poll-cpl3", commandLine: "iters=8192", pollerIdle: 1_000_000_000) { $0.verify = false }
        #expect(on.stop == .guestExit(status: 0))
        let or = on.report.filter { $0.instruction.hasPrefix("or ") }
        #expect(Set(or.map(\.site.direction)) == [.read, .write], "\(on.report.map(\.description))")
        #expect(or.allSatisfy { $0.state == .refused && $0.refusal?.reason.hasSuffix("read-modify-write") == true }, "\(or.map(\.description))")
        let served = on.report.filter { $0.site.kind == .mmio && ($0.site.address == 0xd000_0004 || $0.site.address == 0xd000_0040)
            && !$0.instruction.hasPrefix("or ") }
        #expect(served.count >= 4 && served.allSatisfy { $0.state == .patched && $0.hitsServed > 0 }, "\(served.map(\.description))")
        #expect(on.lines == off.lines)
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum"))
    }
}

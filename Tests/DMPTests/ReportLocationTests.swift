import DMP
import Logging
import Testing
import VMMKit
import VMMKitTesting

// The DMP report and its log lines name a site by its instruction's start, not by the exit's RIP, which KVM leaves
// past an `out` or an MMIO store (mock backend, the PVM RIP model: RIP past the `out` at its exit).

private let base: UInt64 = 0x10_0000
/// g (0x100000, 7 bytes): `mov edx, 0x3f8`, `out dx, al` (g+0x5; its exits at g+0x6), `ret`;
/// h (0x100010, 8 bytes): NOPs, from which a scripted exit no instruction there can make comes (not located).
private let code: [UInt8] = [0xba, 0xf8, 0x03, 0x00, 0x00, 0xee, 0xc3] + [UInt8](repeating: 0xcc, count: 9)
    + [UInt8](repeating: 0x90, count: 7) + [0xc3]
private let out = base + 5
private let exitTHR = VMExit.io(PortIO(port: 0x3f8, size: 1, direction: .write, value: 0x41))

@Suite("The DMP report names sites by their instruction's start")
struct ReportLocationTests {
    @Test("an out patched: its row, the report text and the log name g+0x5 (the exit RIP g+0x6 kept as exitLocation and noted once); a site not located is marked (exit rip)")
    func namedByInstruction() throws {
        let mock = MockHypervisor()
        let vm = try VirtualMachine(backend: mock, configuration: VMConfiguration(memorySize: 32 << 20))
        try vm.bus.attach(DiscardingDevice(), ports: 0x3f8..<0x400)
        _ = try X86Boot.load(.flat(code + [UInt8](repeating: 0x90, count: 0x1000 - code.count), loadAddress: base), into: vm)
        let v = try #require(mock.vcpu(0))
        v.currentRegisters.rdx = 0x3f8
        var c = DMPConfiguration()
        c.threshold = 8
        c.symbols = SymbolTable([GuestSymbol(name: "g", address: base, size: 7, isFunction: true),
                                 GuestSymbol(name: "h", address: base + 0x10, size: 8, isFunction: true)])
        c.codeRanges = [GuestRange(start: GuestAddress(base), size: 0x1000)]
        let log = FaultLog()
        let dmp = DMPMiddleware.install(on: vm, rings: nil, configuration: c, logger: Logger(label: "test.dmp.report") { _ in log })
        var steps: [MockStep] = []
        for _ in 0..<8 { steps += [.jump(to: out), .access(exitTHR, length: 1)] }
        for _ in 0..<8 { steps += [.jump(to: base + 0x13), .access(exitTHR, length: 1)] }
        v.script(steps)
        #expect(try vm.run() == .halted)

        let report = dmp.report()
        let row = try #require(report.first { $0.site.rip == out + 1 }, "\(report)")
        #expect(row.state == .patched && row.instructionAddress == out, "\(row)")
        #expect(row.location == "g+0x5" && row.exitLocation == "g+0x6", "\(row)")
        let lost = try #require(report.first { $0.site.rip == base + 0x14 }, "\(report)")
        #expect(lost.state == .refused && lost.instructionAddress == nil, "\(lost)")
        #expect(lost.location == "h+0x4" && lost.exitLocation == "h+0x4", "\(lost)")
        #expect(lost.description.hasPrefix("h+0x4 (exit rip) ? refused"), "\(lost.description)")

        let text = DMPReport.text(report)
        #expect(text.contains("\ng+0x5 ") && !text.contains("\ng+0x6"), "\(text)")
        #expect(text.contains("exits reported past the instruction") && text.contains("g+0x5 at +0x6"), "\(text)")
        #expect(text.contains("\nh+0x4 (exit rip) ") && text.contains("  h+0x4 (exit rip) (port 0x3f8 write1): refused: locate: "), "\(text)")

        // The log: hot before the instruction is located (the exit RIP, marked), then patched at the instruction.
        #expect(log.details("hot").contains { $0.contains("site=g+0x6 (exit rip) io 0x3f8 write1") }, "\(log.all)")
        #expect(log.details("patched").contains { $0.contains("site=g+0x5 io 0x3f8 write1") }, "\(log.all)")
        #expect(log.details("refused").contains { $0.contains("site=h+0x4 (exit rip) io 0x3f8 write1") }, "\(log.all)")
    }

    @Test("the exit note says the symbol once where both share it, both names otherwise; rows whose exit is at the instruction or that no exit names are not noted")
    func exitNote() {
        let s = ExitSite(rip: 0x1012, kind: .io, address: 0x3f8, size: 1, direction: .write)
        let past = PatchSite(site: s, instructionAddress: 0x1011, location: "uart_putc+0x11", exitLocation: "uart_putc+0x12",
                             instruction: "out dx, al")
        let across = PatchSite(site: s, instructionAddress: 0x1011, location: "f+0x20", exitLocation: "g")
        let at = PatchSite(site: ExitSite(rip: 0x1005, kind: .io, address: 0x3fd, size: 1, direction: .read),
                           instructionAddress: 0x1005, location: "uart_putc+0x5", instruction: "in al, dx")
        let via = PatchSite(site: s, instructionAddress: 0x2005, location: "io_in+0x5 via put+0x40", exitLocation: "")
        let text = DMPReport.text([past, across, at, via])
        #expect(text.contains("lists the site at its exit RIP): uart_putc+0x11 at +0x12, f+0x20 at g\n"), "\(text)")
        #expect(!text.contains("(exit rip)"), "every row located")
    }
}

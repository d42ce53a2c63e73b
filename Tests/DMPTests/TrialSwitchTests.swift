import DMP
import Glibc
import Logging
import Testing
import VMMKit
import VMMKitTesting

// An A/B trial's phase switch (RateTrial, DESIGN.md DMP step 7) that finds a vCPU paused where the write may not
// go, with the mock backend: `f`'s 2-byte `out 0x80, al` is served by a function copy entered through a `jmp rel8`
// to a `jmp rel32` in the dead padding after `f`; the test puts the vCPU's RIP on that padding `jmp`'s first byte
// (between the short jump and it) when the trial asks for a switch, and drives the trial's passes itself.

private let base: UInt64 = 0x10_0000
/// f (0x100000, 3 bytes): `out 0x80, al`, `ret`; 8 bytes of int3 (dead padding); g (0x10000b, 1 byte): `ret`.
private let code: [UInt8] = [0xe6, 0x80, 0xc3] + [UInt8](repeating: 0xcc, count: 8) + [0xc3]
private let site = base
private let padding = base + 3
private let exitPost = VMExit.io(PortIO(port: 0x80, size: 1, direction: .write, value: 0x42))

/// A VM running the scripted guest with DMP until the copy of `f` is in place, its trial not started.
private final class TrialSwitchRun: @unchecked Sendable {
    static let threshold = 8
    let mock = MockHypervisor()
    let vm: VirtualMachine
    let dmp: DMPMiddleware
    let post = DiscardingDevice()
    var hits: UInt64 = 0

    init(busyPasses: Int = 50) throws {
        vm = try VirtualMachine(backend: mock, configuration: VMConfiguration(memorySize: 32 << 20))
        try vm.bus.attach(post, ports: 0x80..<0x81)
        _ = try X86Boot.load(.flat(code + [UInt8](repeating: 0x90, count: 0x1000 - code.count), loadAddress: base), into: vm)
        let v = try #require(mock.vcpu(0))
        v.currentRegisters.rip = site
        let c = trialTestConfiguration(threshold: TrialSwitchRun.threshold, base: base, fSize: 3, gAddress: base + 11,
                                       busyPasses: busyPasses)
        var logger = Logger(label: "test.dmp.trialswitch")
        logger.logLevel = .critical
        dmp = DMPMiddleware.install(on: vm, rings: nil, configuration: c, logger: logger)
        try #require(mock.vcpu(0)).script((0..<TrialSwitchRun.threshold).flatMap { _ in
            [MockStep.jump(to: site), .access(exitPost, length: 2)]
        })
        #expect(try vm.run() == .halted)
        try #require(row?.state == .patched, "\(dmp.report())")
        // The hot `out` became `jmp rel8` to the padding, which holds a `jmp rel32` to the copy.
        try #require(guestCode[0] == 0xeb && guestCode[3] == 0xe9, "\(guestCode)")
        // Verification looks at patches 50 ms old or older; the trial starts once the copy served an access.
        usleep(60_000)
        try serve(10)
    }

    var row: PatchSite? { dmp.report().first { $0.instructionAddress == site } }

    var guestCode: [UInt8] { (try? vm.memory.readBytes(at: GuestAddress(base), count: code.count)) ?? [] }

    /// Where the vCPU is paused when the next switch is tried.
    func pause(at rip: UInt64) throws { try #require(mock.vcpu(0)).currentRegisters.rip = rip }

    /// `n` more accesses served in the copy (its hit counter, as its body counts them).
    func serve(_ n: UInt64) throws {
        let site = try #require(row?.site)
        let counter = try #require(dmp.testSeam.hitCounters[site], "no hit counter for \(site)")
        hits += n
        try vm.memory.write(hits, at: counter)
    }
}

@Suite("A/B trial phase switches that find a vCPU inside the bytes to write (mock backend)")
struct TrialSwitchTests {
    @Test("a vCPU at the padding jmp's first byte at one switch and not at the next: the switch waits a pass, the trial completes and pays")
    func busyThenSwitched() throws {
        let r = try TrialSwitchRun()
        let patched = r.guestCode
        // The trial asks for its first off phase while the vCPU sits between the short jump and the padding jmp.
        try r.pause(at: padding)
        r.dmp.testSeam.verify()
        #expect(r.guestCode == patched, "nothing written under the vCPU")
        var row = try #require(r.row)
        #expect(row.state == .patched && row.refusal == nil && row.undoFailure == nil && row.trialResult == nil, "\(row)")
        // Patched but not judged yet: the row and the report's text say the trial is under way.
        #expect(row.trialUnderWay, "\(row)")
        #expect(DMPReport.text(r.dmp.report()).contains("A/B trial under way (patched, not judged yet; the trial may still undo it): "
                                                         + row.location), "\(DMPReport.text(r.dmp.report()))")
        // The next pass, the vCPU elsewhere: the off phase starts (the guest's bytes back).
        try r.pause(at: base + 0x100)
        r.dmp.testSeam.verify()
        #expect(r.guestCode == code, "off phase: the original bytes")
        // The off phase, then the on phase (patched again), then the verdict: faster patched.
        try r.serve(10)
        usleep(10_000)
        r.dmp.testSeam.verify()
        #expect(r.guestCode == patched, "on phase: the patch again")
        try r.serve(1_000)
        usleep(10_000)
        r.dmp.testSeam.verify()
        row = try #require(r.row)
        #expect(row.state == .patched && row.refusal == nil, "\(row)")
        #expect(row.trialResult?.contains("accesses/s patched") == true, "\(row)")
        #expect(!row.trialUnderWay && !DMPReport.text(r.dmp.report()).contains("A/B trial under way"), "\(row)")
        #expect(r.guestCode == patched)
    }

    @Test("a vCPU inside at every switch: after trialSwitchBusyPasses passes in a row the trial gives up and the patch is undone with the reason")
    func busyGivesUp() throws {
        let r = try TrialSwitchRun(busyPasses: 3)
        let patched = r.guestCode
        try r.pause(at: padding)
        for _ in 0..<2 {
            r.dmp.testSeam.verify()
            let row = try #require(r.row)
            #expect(row.state == .patched && row.refusal == nil && row.undoFailure == nil, "\(row)")
        }
        #expect(r.guestCode == patched)
        // The third busy pass gives up; the undo finds the vCPU still there and waits for the next pass too.
        r.dmp.testSeam.verify()
        var row = try #require(r.row)
        #expect(row.state == .patched && row.undoFailure?.contains("vCPU 0 is inside the instruction at 0x100003 (at its first byte)") == true, "\(row)")
        #expect(r.guestCode == patched)
        try r.pause(at: base + 0x100)
        r.dmp.testSeam.periodic()
        row = try #require(r.row)
        #expect(row.state == .undone && row.undoFailure == nil, "\(row)")
        let why = row.refusal?.reason ?? ""
        #expect(row.refusal?.stage == .verify && why.hasPrefix("an A/B trial could not switch the patch off in 3 passes in a row")
                && why.contains("vCPU 0 is inside the instruction at 0x100003 (at its first byte)"), "\(why)")
        #expect(r.guestCode == code)
        #expect(r.post.granted == 0)
    }
}

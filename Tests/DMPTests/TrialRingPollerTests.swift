import DMP
import Glibc
import Logging
import Testing
import VMMKit
import VMMKitTesting

// An A/B trial's off phase of a patch that appends to a paravirtual ring (RateTrial, DESIGN.md DMP step 7), with the
// mock backend and the standard devices: `f`'s `out dx, al` to the UART's THR (port 0x3f8) is served by a function
// copy that appends to ring 0. While the trial has the guest's original bytes back, the ring device must count no
// producer (the poller sleeps as after an undo): a THR write exit then is the guest using the UART, not a producer's
// fallback that restarts the poller's idle period. Before, both arms paid for a polling thread (on a loaded host,
// c-uart-cpl0's trials kept patches that left the guest slower than without DMP).

private let base: UInt64 = 0x10_0000
/// f (0x100000, 7 bytes): `mov edx, 0x3f8`, `out dx, al`, `ret`; 8 bytes of int3 (dead padding); g (0x10000f,
/// 1 byte): `ret`. The copy is entered through f's 5-byte first instruction.
private let code: [UInt8] = [0xba, 0xf8, 0x03, 0x00, 0x00, 0xee, 0xc3] + [UInt8](repeating: 0xcc, count: 8) + [0xc3]
private let site = base + 5
private let thr = VMExit.io(PortIO(port: 0x3f8, size: 1, direction: .write, value: 0x41))

@Suite("A/B trial of a ring patch: the off phase detaches its producer (mock backend)")
struct TrialRingPollerTests {
    @Test("off phase: a THR write exit is no producer fallback (the poller may sleep); on phase: it is one again")
    func offPhaseDetachesProducer() throws {
        let mock = MockHypervisor()
        let vm = try VirtualMachine(backend: mock, configuration: VMConfiguration(memorySize: 32 << 20))
        let devices = try StandardDevices.install(on: vm, console: OutputSink { _ in }, ringPolling: .disabled)
        _ = try X86Boot.load(.flat(code + [UInt8](repeating: 0x90, count: 0x1000 - code.count), loadAddress: base), into: vm)
        let v = try #require(mock.vcpu(0))
        v.currentRegisters.rip = site
        v.currentRegisters.rdx = 0x3f8
        let c = trialTestConfiguration(threshold: 8, base: base, fSize: 7, gAddress: base + 15)
        var logger = Logger(label: "test.dmp.trialring")
        logger.logLevel = .critical
        let dmp = DMPMiddleware.install(on: vm, rings: devices.rings, configuration: c, logger: logger)
        func run(_ writes: Int) throws {
            try #require(mock.vcpu(0)).script((0..<writes).flatMap { _ in [MockStep.jump(to: site), .access(thr, length: 1)] })
            #expect(try vm.run() == .halted)
        }
        func fallbacks() -> Int { devices.rings.statistics(ring: 0).fallbacks }
        try run(8)
        let row = try #require(dmp.report().first { $0.instructionAddress == site })
        try #require(row.state == .patched && row.strategy.hasPrefix("function copy"), "\(dmp.report())")
        let counter = try #require(dmp.testSeam.hitCounters[row.site], "no hit counter")
        var hits: UInt64 = 10
        try vm.memory.write(hits, at: counter)
        let patched = try vm.memory.readBytes(at: GuestAddress(base), count: code.count)
        // Verification looks at patches 50 ms old or older; the trial starts with the off phase.
        usleep(60_000)
        dmp.testSeam.verify()
        #expect(try vm.memory.readBytes(at: GuestAddress(base), count: code.count) == code, "off phase: the original bytes")
        let before = fallbacks()
        try run(3)
        #expect(fallbacks() == before, "off phase: the guest's THR writes are no producer fallbacks")
        // The on phase: the patch written again, its producer attached again.
        usleep(10_000)
        dmp.testSeam.verify()
        #expect(try vm.memory.readBytes(at: GuestAddress(base), count: code.count) == patched, "on phase: the patch again")
        hits += 100
        try vm.memory.write(hits, at: counter)
        try run(1)
        #expect(fallbacks() == before + 1, "on phase: a THR write exit is a producer's fallback")
    }
}

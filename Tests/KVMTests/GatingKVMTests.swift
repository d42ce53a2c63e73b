import DMP
import Logging
import Synchronization
import Testing
import VMMKit

/// A UART stand-in whose line-status read is a constant fast path the device may declare dependent on its
/// pending THR ring entries, and whose THR write is an asynchronous ring append. It records what reached it.
final class GatedUART: BusDevice, @unchecked Sendable {
    let name = "gated-uart"
    let independent: Bool
    private let state = Mutex<(output: [UInt8], lineStatusReads: Int)>(([], 0))
    var output: [UInt8] { state.withLock { $0.output } }
    var lineStatusReads: Int { state.withLock { $0.lineStatusReads } }
    init(independent: Bool) { self.independent = independent }

    func read(offset: UInt64, size: Int) -> UInt64 {
        guard offset == 5 else { return 0 }
        state.withLock { $0.lineStatusReads += 1 }
        return 0x60
    }

    func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect {
        if offset == 0 { state.withLock { $0.output.append(UInt8(truncatingIfNeeded: value)) } }
        return .none
    }

    func grantFastPath(_ request: FastPathRequest, enableWord: FastPathEnableWord) -> FastPathDescription? {
        guard request.size == 1 else { return nil }
        switch (request.offset, request.direction, request.ring) {
        case (5, .read, _):
            enableWord.store(true)
            return FastPathDescription(.constantRead(0x60), for: request, independentOfPendingRingEntries: independent)
        case (0, .write, let ring?):
            enableWord.store(true)
            return FastPathDescription(.ringAppend(ring: ring, mode: .asynchronous), for: request)
        default:
            return nil
        }
    }

    func revokeFastPath(_ enableWord: FastPathEnableWord) { enableWord.store(false) }
}

/// uart-cpl3 against ``GatedUART`` with ring 0 feeding its THR and no polling consumer (entries are applied
/// when an exit drains the rings, and by the drain timer): with DMP on or off.
struct GatedUARTRun {
    let device: GatedUART
    let stop: StopReason
    let report: [PatchSite]

    init(independent: Bool, dmp: Bool) throws {
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
        device = GatedUART(independent: independent)
        let rings = try PVRingDevice(memory: vm.memory, bus: vm.bus, targets: [PVRingTarget(space: .pio, address: 0x3f8, width: 1)])
        try vm.bus.attach(device, ports: 0x3f8..<0x400)
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        try vm.bus.attach(PostCodePort(), ports: 0x80..<0x81)
        rings.attach(to: vm)
        vm.addExitHandler(PhaseMarker(port: StandardDevices.markerPort))
        let loaded = try X86Boot.load(.elf(try guestImage("uart-cpl3")), commandLine: "iters=200", into: vm)
        var middleware: DMPMiddleware?
        if dmp {
            var c = DMPConfiguration()
            c.use(loaded)
            c.userModeFastPaths = true
            c.verify = false // a gated read that keeps exiting is what this run is about
            var logger = Logger(label: "test.dmp")
            logger.logLevel = .critical
            middleware = DMPMiddleware.install(on: vm, rings: rings, configuration: c, logger: logger)
        }
        stop = try vm.run()
        report = middleware?.report() ?? []
    }
}

extension KVMTests {
    @Test("a read the device did not declare independent of its pending ring entries falls back while its THR entries are pending; declared independent, it is served")
    func pendingRingGating() throws {
        let off = try GatedUARTRun(independent: false, dmp: false)
        #expect(off.stop == .guestExit(status: 0))
        let characters = off.device.output.count
        #expect(characters > 7000 && off.device.lineStatusReads >= characters)
        for independent in [false, true] {
            let on = try GatedUARTRun(independent: independent, dmp: true)
            #expect(on.stop == off.stop)
            // Everything but the RESULT line's cycle count (a timing).
            let text = String(decoding: on.device.output, as: UTF8.self), offText = String(decoding: off.device.output, as: UTF8.self)
            #expect(text.split(separator: "\n").filter { !$0.hasPrefix("RESULT") } == offText.split(separator: "\n").filter { !$0.hasPrefix("RESULT") })
            #expect(resultField(text, "checksum") == resultField(offText, "checksum") && resultField(text, "checksum") != nil)
            let lsr = try #require(on.report.first { $0.site.address == 0x3fd }, "\(on.report)")
            let thr = try #require(on.report.first { $0.site.address == 0x3f8 }, "\(on.report)")
            #expect(lsr.state == .patched && thr.state == .patched, "\(on.report)")
            #expect(thr.hitsServed > 5000, "THR writes go through the ring")
            if independent {
                #expect(lsr.hitsServed > 5000, "\(lsr)")
                #expect(on.device.lineStatusReads < characters / 4)
            } else {
                // Each LSR read follows the previous character's THR entry, still pending (nobody polls):
                // it exits, the exit drains the ring, and the device sees the write before the read.
                #expect(lsr.exitsWhilePatched > 5000, "\(lsr)")
                #expect(lsr.hitsServed < UInt64(lsr.exitsWhilePatched / 4), "\(lsr)")
                #expect(on.device.lineStatusReads > characters * 3 / 4)
            }
        }
    }
}

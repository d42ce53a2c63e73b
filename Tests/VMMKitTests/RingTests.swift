import Testing
import VMMKit
import VMMKitTesting
#if canImport(Glibc)
import Glibc
#endif

@Suite("Paravirtual ring consumer")
struct RingTests {
    final class Sink: BusDevice {
        let name = "sink"
        var values: [UInt64] = []
        func read(offset: UInt64, size: Int) -> UInt64 { 0 }
        func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect { values.append(value); return .none }
    }

    func setUp(slots: UInt32 = 8) throws -> (GuestMemory, PVRingDevice, Sink) {
        let m = try GuestMemory(size: 32 << 20)
        let bus = IOBus()
        let sink = Sink()
        try bus.attach(sink, ports: 0x3f8..<0x3f9)
        let ring = try PVRingDevice(memory: m, bus: bus, targets: [PVRingTarget(space: .pio, address: 0x3f8)], slotCount: slots)
        return (m, ring, sink)
    }

    /// Publishes one slot the way a guest producer does.
    func produce(_ m: GuestMemory, _ ring: PVRingDevice, value: UInt64, width: UInt32 = 1, publish: Bool = true) throws {
        let h = ring.header(0).rawValue
        let p: UInt32 = try m.read(at: GuestAddress(h))
        let slot = h + 64 + UInt64(p & (ring.slotCount - 1)) * 16
        try m.write(value, at: GuestAddress(slot))
        try m.write(width, at: GuestAddress(slot + 8))
        if publish { try m.write(p &+ 1, at: GuestAddress(slot + 12)) }
        try m.write(p &+ 1, at: GuestAddress(h))
    }

    @Test("headers are initialised; published slots are consumed in order, across wrap-around")
    func inOrder() throws {
        let (m, ring, sink) = try setUp()
        #expect(try m.read(UInt32.self, at: GuestAddress(ring.header(0).rawValue + 12)) == PVRingDevice.magic)
        #expect(try m.read(UInt32.self, at: GuestAddress(ring.header(0).rawValue + 8)) == 8)
        for round in 0..<3 {
            for i in 0..<6 { try produce(m, ring, value: UInt64(round * 10 + i)) }
            _ = try ring.drain()
        }
        #expect(sink.values == (0..<3).flatMap { r in (0..<6).map { UInt64(r * 10 + $0) } })
        #expect(try m.read(UInt32.self, at: GuestAddress(ring.header(0).rawValue + 4)) == 18, "consumer index published")
    }

    @Test("a reserved but unpublished slot stops the drain until it is published")
    func unpublished() throws {
        let (m, ring, sink) = try setUp()
        try produce(m, ring, value: 1)
        try produce(m, ring, value: 2, publish: false)
        try produce(m, ring, value: 3)
        _ = try ring.drain()
        #expect(sink.values == [1])
        let slot = ring.header(0).rawValue + 64 + 1 * 16
        try m.write(UInt32(2), at: GuestAddress(slot + 12))
        _ = try ring.drain()
        #expect(sink.values == [1, 2, 3])
    }

    @Test("hostile producer indices are refused with a typed error", arguments: [UInt32(9), 100, 0xffff_ffff])
    func hostileProducer(producer: UInt32) throws {
        let (m, ring, sink) = try setUp()
        try m.write(producer, at: ring.header(0))
        #expect(throws: PVRingError.indexOutOfRange(ring: 0, producer: producer, consumer: 0, slots: 8)) { _ = try ring.drain() }
        #expect(sink.values.isEmpty)
    }

    @Test("a guest-rewritten slot count is ignored; an invalid width is refused")
    func hostileSlots() throws {
        let (m, ring, sink) = try setUp()
        try m.write(UInt32(0xffff_ffff), at: GuestAddress(ring.header(0).rawValue + 8))
        try produce(m, ring, value: 0x1ff, width: 1)
        _ = try ring.drain()
        #expect(sink.values == [0xff], "value masked to its width; VMM's slot count used")
        try produce(m, ring, value: 7, width: 3)
        #expect(throws: PVRingError.invalidWidth(ring: 0, slot: 1, width: 3)) { _ = try ring.drain() }
    }

    @Test("a bad layout is refused")
    func layout() throws {
        let m = try GuestMemory(size: 32 << 20)
        #expect(throws: PVRingError.self) { _ = try PVRingDevice(memory: m, bus: IOBus(), targets: [PVRingTarget(space: .pio, address: 0)], slotCount: 3) }
        #expect(throws: PVRingError.self) { _ = try PVRingDevice(memory: m, bus: IOBus(), targets: [PVRingTarget(space: .pio, address: 0)], slotCount: 1024) }
        let small = try GuestMemory(size: 2 << 20)
        #expect(throws: PVRingError.self) { _ = try PVRingDevice(memory: small, bus: IOBus(), targets: [PVRingTarget(space: .pio, address: 0)]) }
    }
}

@Suite("Paravirtual ring drain timer")
struct RingTimerTests {
    @Test("the drain timer delivers ring entries while the vCPU never exits")
    func timerDrains() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock, memory: 32 << 20)
        let out = CapturedOutput()
        let devices = try StandardDevices.install(on: vm, console: out.sink())
        mock.vcpu(0)?.script([.spin])
        try vm.start()
        // Act as the guest: publish "hi\n" into ring 0 (the UART) without exiting.
        let h = devices.rings.header(0).rawValue
        for (i, b) in Array("hi\n".utf8).enumerated() {
            let slot = h + 64 + UInt64(i) * 16
            try vm.memory.write(UInt64(b), at: GuestAddress(slot))
            try vm.memory.write(UInt32(1), at: GuestAddress(slot + 8))
            try vm.memory.write(UInt32(i + 1), at: GuestAddress(slot + 12))
            try vm.memory.write(UInt32(i + 1), at: GuestAddress(h))
        }
        var waited = 0
        while out.text != "hi\n" && waited < 200 { usleep(5_000); waited += 1 }
        #expect(out.text == "hi\n", "drained within a second by the timer")
        vm.stop()
        #expect(try vm.wait() == .stopped)
    }

    @Test("a hostile index seen by the timer stops the VM with the ring error")
    func timerError() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock, memory: 32 << 20)
        let devices = try StandardDevices.install(on: vm, console: CapturedOutput().sink())
        mock.vcpu(0)?.script([.spin, .spin])
        try vm.start()
        try vm.memory.write(UInt32(0x8000_0000), at: devices.rings.header(1))
        #expect {
            _ = try vm.wait()
        } throws: { e in
            guard case VMError.ring(.indexOutOfRange(ring: 1, producer: 0x8000_0000, consumer: 0, slots: 256)) = e else { return false }
            return true
        }
    }
}

import Testing
import VMMKit
import VMMKitTesting

@Suite("I/O bus and devices")
struct BusAndDeviceTests {
    @Test("dispatch by range with offsets; unclaimed reads are all ones and counted")
    func dispatch() throws {
        let bus = IOBus()
        let a = RecordingDevice(name: "a", readValue: 0x100), b = RecordingDevice(name: "b", readValue: 0x200)
        try bus.attach(a, ports: 0x3f8..<0x400)
        try bus.attach(b, mmio: GuestRange(start: GuestAddress(0xd000_0000), size: 0x1000))
        #expect(bus.read(.pio, address: 0x3fd, size: 1) == 0x105)
        #expect(bus.write(.mmio, address: 0xd000_0040, size: 4, value: 9) == DeviceEffect.none)
        #expect(b.writes.first?.offset == 0x40)
        #expect(bus.read(.pio, address: 0x400, size: 1) == nil)
        #expect(bus.read(.mmio, address: 0xd000_1000, size: 4) == nil)
        #expect(bus.unclaimedCounts[UnclaimedAccess(space: .pio, address: 0x400, direction: .read)] == 1)
        #expect(allOnes(size: 1) == 0xff && allOnes(size: 4) == 0xffff_ffff && allOnes(size: 8) == .max)
    }

    @Test("overlapping ranges are rejected; the same range in the other space is fine")
    func overlap() throws {
        let bus = IOBus()
        try bus.attach(RecordingDevice(name: "uart"), ports: 0x3f8..<0x400)
        #expect(throws: BusError.self) { try bus.attach(RecordingDevice(), ports: 0x3ff..<0x401) }
        #expect(throws: BusError.self) { try bus.attach(RecordingDevice(), ports: 0x3f0..<0x3f9) }
        #expect(throws: BusError.self) { try bus.attach(RecordingDevice(), ports: 0x3f8..<0x3f8) }
        try bus.attach(RecordingDevice(), ports: 0x400..<0x401)
        try bus.attach(RecordingDevice(), mmio: GuestRange(start: GuestAddress(0x3f8), size: 8))
    }

    @Test("string I/O with count > 1: every element goes through the bus, reads are completed per element")
    func stringIO() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        let captured = CapturedOutput()
        try vm.bus.attach(UART8250(sink: captured.sink()), ports: 0x3f8..<0x400)
        let source = RecordingDevice(name: "src", readValue: 0x40)
        try vm.bus.attach(source, ports: 0x702..<0x703)
        mock.vcpu(0)?.script([
            .exit(.io(PortIO(port: 0x3f8, size: 1, count: 4, direction: .write)), data: [0x41, 0x42, 0x43, 0x0a]),
            .exit(.io(PortIO(port: 0x702, size: 1, count: 3, direction: .read))),
        ])
        _ = try vm.run()
        #expect(captured.text == "ABC\n")
        #expect(source.reads.count == 3)
        #expect(mock.vcpu(0)?.completedReads[1] == [0: 0x40, 1: 0x40, 2: 0x40])
    }

    @Test("MMIO reads return the device's value; unclaimed MMIO reads return all ones")
    func mmioRead() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        try vm.bus.attach(RecordingDevice(readValue: 0x1234_5678), mmio: GuestRange(start: GuestAddress(0xc000_0000), size: 0x1000))
        mock.vcpu(0)?.script([
            .exit(.mmio(MMIOAccess(address: GuestAddress(0xc000_0000), size: 4, direction: .read))),
            .exit(.mmio(MMIOAccess(address: GuestAddress(0xc100_0000), size: 2, direction: .read))),
        ])
        _ = try vm.run()
        #expect(mock.vcpu(0)?.completedReads[0] == [0: 0x1234_5678])
        #expect(mock.vcpu(0)?.completedReads[1] == [0: 0xffff])
    }

    @Test("strict mode stops on an unclaimed access, naming the address and RIP")
    func strict() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock, strict: true)
        var r = Registers(); r.rip = 0x100abc
        mock.vcpu(0)?.currentRegisters = r
        mock.vcpu(0)?.script([out(0x123, 1)])
        #expect {
            try vm.run()
        } throws: { e in
            guard case VMError.unclaimedAccess(.pio, 0x123, .write, 0, 0x100abc) = e else { return false }
            return (e as? VMError)?.description.contains("0x123") == true
        }
    }

    @Test("UART: divisor latch, scratch, line status, loopback and the fast-path preconditions")
    func uart() {
        let captured = CapturedOutput()
        let sink = captured.sink()
        let u = UART8250(sink: sink)
        #expect(u.read(offset: 5, size: 1) & 0x60 == 0x60, "transmitter empty")
        _ = u.write(offset: 3, size: 1, value: 0x83) // DLAB
        _ = u.write(offset: 0, size: 1, value: 0x01)
        _ = u.write(offset: 1, size: 1, value: 0x02)
        #expect(u.read(offset: 0, size: 1) == 0x01 && u.read(offset: 1, size: 1) == 0x02)
        let words = FastPathEnableWordStorage(count: 2)
        let thr = u.grantFastPath(FastPathRequest(offset: 0, size: 1, direction: .write, ring: 0), enableWord: words[0])
        #expect(thr?.kind == .ringAppend(ring: 0, mode: .asynchronous))
        #expect(!words[0].isSet, "DLAB set: THR writes are divisor writes")
        _ = u.write(offset: 3, size: 1, value: 0x03)
        #expect(words[0].isSet)
        _ = u.write(offset: 7, size: 1, value: 0x5a)
        #expect(u.read(offset: 7, size: 1) == 0x5a)
        _ = u.write(offset: 0, size: 1, value: UInt64(UInt8(ascii: "h")))
        _ = u.write(offset: 0, size: 1, value: 0x0a)
        #expect(captured.text == "h\n", "flushed on newline")
        _ = u.write(offset: 4, size: 1, value: 0x10) // loopback
        _ = u.write(offset: 0, size: 1, value: 0x55)
        #expect(u.read(offset: 5, size: 1) & 1 == 1, "looped-back byte is ready")
        #expect(u.grantFastPath(FastPathRequest(offset: 5, size: 1, direction: .read), enableWord: words[1])?.kind == .constantRead(0x60))
        #expect(!words[1].isSet && !words[0].isSet, "loopback: neither fast path is exact")
        #expect(u.read(offset: 0, size: 1) == 0x55)
        #expect(captured.text == "h\n", "loopback output never reaches the sink")
        _ = u.write(offset: 0 + 4, size: 1, value: 0)
        _ = u.write(offset: 0, size: 1, value: UInt64(UInt8(ascii: "x")))
        sink.flush()
        #expect(captured.text == "h\nx", "flush writes out a partial line")
    }

    @Test("doorbell: completions land in the queue; a bad queue is an error bit, not a crash")
    func doorbell() throws {
        let m = try GuestMemory(size: 1 << 20)
        let d = DoorbellDevice(memory: m)
        #expect(d.read(offset: 0, size: 4) == UInt64(DoorbellDevice.id))
        _ = d.write(offset: 0x08, size: 4, value: 0x8000)
        _ = d.write(offset: 0x10, size: 4, value: 4)
        _ = d.write(offset: 0x14, size: 4, value: 1)
        for v in 0..<5 as Range<UInt64> { _ = d.write(offset: 0x40, size: 4, value: v) }
        #expect(d.read(offset: 4, size: 4) == 5)
        #expect(try m.read(UInt32.self, at: GuestAddress(0x8000)) == 4 ^ 0x5a5a_5a5a, "5th completion wrapped to slot 0")
        #expect(try m.read(UInt32.self, at: GuestAddress(0x8004)) == 5)
        _ = d.write(offset: 0x08, size: 4, value: 0xffff_fff0)
        _ = d.write(offset: 0x40, size: 4, value: 1)
        #expect(d.read(offset: 0x18, size: 4) != 0)
        #expect(d.read(offset: 4, size: 4) == 5)
    }
}

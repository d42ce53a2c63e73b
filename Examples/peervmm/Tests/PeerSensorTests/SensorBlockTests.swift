// The sensor block's fast-path contract, checked through VMMKit's public API only (this package
// cannot see VMMKit's `package` symbols, and imports nothing with @testable).
import Testing
import PeerSensor
import VMMKit
import VMMKitTesting

private let base: UInt64 = 0xD010_0000

/// A bus with the sensor block at `base`.
private func sensorBus() throws -> (IOBus, SensorBlock) {
    let bus = IOBus()
    let sensor = SensorBlock()
    try bus.attach(sensor, mmio: GuestRange(start: GuestAddress(base), size: 0x1000))
    return (bus, sensor)
}

private func write(_ bus: IOBus, _ offset: UInt64, _ value: UInt64) {
    guard let (device, at, _) = bus.device(at: base + offset, space: .mmio) else { return }
    _ = device.write(offset: at, size: 4, value: value)
}

@Suite("SensorBlock's fast paths")
struct SensorBlockTests {
    @Test("STATUS: a constant READY read, independent of pending ring entries, its word set only while enabled")
    func status() throws {
        let (bus, _) = try sensorBus()
        let word = FastPathEnableWordStorage(count: 1)[0]
        let granted = try bus.grantFastPath(space: .mmio, address: base + SensorBlock.statusOffset, size: 4,
                                            direction: .read, enableWord: word)
        #expect(granted.description.kind == .constantRead(UInt64(SensorBlock.ready)))
        #expect(granted.description.independentOfPendingRingEntries)
        #expect(!word.isSet, "disabled at reset: STATUS reads 0, not the constant")
        write(bus, SensorBlock.controlOffset, 1)
        #expect(word.isSet)
        write(bus, SensorBlock.controlOffset, 0)
        #expect(!word.isSet)
        write(bus, SensorBlock.controlOffset, 1)
        bus.revokeFastPath(space: .mmio, address: base + SensorBlock.statusOffset, enableWord: word)
        #expect(!word.isSet, "revoked: clear, and never written again")
        write(bus, SensorBlock.controlOffset, 1)
        #expect(!word.isSet)
    }

    @Test("DATA: an asynchronous append to the ring the bus offers; none without a ring, none at other widths")
    func data() throws {
        let (bus, _) = try sensorBus()
        let words = FastPathEnableWordStorage(count: 3)
        write(bus, SensorBlock.controlOffset, 1)
        let granted = try bus.grantFastPath(space: .mmio, address: base + SensorBlock.dataOffset, size: 4,
                                            direction: .write, ring: 2, enableWord: words[0])
        #expect(granted.description.kind == .ringAppend(ring: 2, mode: .asynchronous))
        #expect(words[0].isSet)
        write(bus, SensorBlock.controlOffset, 0)
        #expect(!words[0].isSet, "a disabled block drops samples: the append would not be exact")
        #expect(throws: FastPathRefusal.declined(device: "sensor")) {
            _ = try bus.grantFastPath(space: .mmio, address: base + SensorBlock.dataOffset, size: 4, direction: .write,
                                      enableWord: words[1])
        }
        #expect(throws: FastPathRefusal.declined(device: "sensor")) {
            _ = try bus.grantFastPath(space: .mmio, address: base + SensorBlock.dataOffset, size: 2, direction: .write,
                                      ring: 2, enableWord: words[2])
        }
    }

    @Test("COUNT: a shared-slot read, the slot current after every sample (by exit or from a ring batch)")
    func count() throws {
        let (bus, sensor) = try sensorBus()
        let word = FastPathEnableWordStorage(count: 1)[0]
        let slots = FastPathSlotStorage(count: 1)
        write(bus, SensorBlock.controlOffset, 1)
        write(bus, SensorBlock.dataOffset, 7)
        let granted = try bus.grantFastPath(space: .mmio, address: base + SensorBlock.countOffset, size: 4,
                                            direction: .read, slot: slots[0], enableWord: word)
        #expect(granted.description.kind == .sharedSlotRead(slot: 0))
        #expect(!granted.description.independentOfPendingRingEntries, "a sample still in the ring is not counted yet")
        #expect(word.isSet)
        #expect(slots.load(0) == 1)
        write(bus, SensorBlock.dataOffset, 8)
        #expect(slots.load(0) == 2)
        let batch: [UInt64] = [1, 2, 3]
        _ = batch.withUnsafeBufferPointer { sensor.writeBatch(offset: SensorBlock.dataOffset, size: 4, values: $0) }
        #expect(slots.load(0) == 5)
        #expect(sensor.count == 5)
        write(bus, SensorBlock.controlOffset, 3)   // enable and reset
        #expect(slots.load(0) == 0)
        #expect(word.isSet, "COUNT is exact whether enabled or not")
    }

    @Test("no fast path for ID, CONTROL, HASH or DROPPED")
    func declined() throws {
        let (bus, _) = try sensorBus()
        let words = FastPathEnableWordStorage(count: 4)
        for (i, offset) in [0x00, SensorBlock.controlOffset, SensorBlock.hashOffset, SensorBlock.droppedOffset].enumerated() {
            #expect(throws: FastPathRefusal.self) {
                _ = try bus.grantFastPath(space: .mmio, address: base + offset, size: 4, direction: .read,
                                          slot: FastPathSlotStorage(count: 1)[0], enableWord: words[i])
            }
        }
    }

    @Test("with StandardDevices' extra ring: entries a producer appends reach DATA in order, and a COUNT exit sees them")
    func ringToDevice() throws {
        let mock = MockHypervisor()
        let vm = try VirtualMachine(backend: mock, configuration: VMConfiguration(memorySize: 32 << 20))
        let sensor = SensorBlock()
        try vm.bus.attach(sensor, mmio: GuestRange(start: GuestAddress(base), size: 0x1000))
        let devices = try StandardDevices.install(on: vm, console: CapturedOutput().sink(), ringPolling: .disabled,
                                                  extraRingTargets: [PVRingTarget(space: .mmio, address: base + SensorBlock.dataOffset,
                                                                                  width: 4)])
        #expect(devices.rings.ring(for: .mmio, address: base + SensorBlock.dataOffset) == 2)
        _ = sensor.write(offset: SensorBlock.controlOffset, size: 4, value: 1)
        let producer = try RingProducerModel(memory: vm.memory, header: devices.rings.header(2))
        for v: UInt32 in [10, 20, 30] { #expect(producer.push(v) == .published) }
        #expect(sensor.count == 0, "nothing applied before a drain")
        mock.vcpu(0)?.script([.exit(.mmio(MMIOAccess(address: GuestAddress(base + SensorBlock.countOffset), size: 4,
                                                     direction: .read)))])
        _ = try vm.run()
        #expect(mock.vcpu(0)?.completedReads.first == [0: 3], "the exit drained the ring before the device answered")
        var expected: UInt32 = 0x811C_9DC5
        for v: UInt32 in [10, 20, 30] { for s in 0..<4 { expected = (expected ^ ((v >> (8 * UInt32(s))) & 0xff)) &* 0x0100_0193 } }
        #expect(sensor.hash == expected, "applied in order")
    }
}

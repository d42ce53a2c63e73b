// The sensor block's fast-path contract, checked through VMMKit's public API only (this package
// cannot see VMMKit's `package` symbols, and imports nothing with @testable).
import Synchronization
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
    @Test("STATUS: a constant READY read, independent of pending ring entries once it has the drain, its word set only while enabled")
    func status() throws {
        let (bus, sensor) = try sensorBus()
        let words = FastPathEnableWordStorage(count: 2)
        let undrained = try bus.grantFastPath(space: .mmio, address: base + SensorBlock.statusOffset, size: 4,
                                              direction: .read, enableWord: words[1])
        #expect(!undrained.description.independentOfPendingRingEntries, "without the drain a disable can overtake a pending sample")
        let drains = Atomic(0)
        sensor.setRingDrain { drains.add(1, ordering: .relaxed) }
        let word = words[0]
        let granted = try bus.grantFastPath(space: .mmio, address: base + SensorBlock.statusOffset, size: 4,
                                            direction: .read, enableWord: word)
        #expect(granted.description.kind == .constantRead(UInt64(SensorBlock.ready)))
        #expect(granted.description.independentOfPendingRingEntries)
        #expect(!word.isSet, "disabled at reset: STATUS reads 0, not the constant")
        write(bus, SensorBlock.controlOffset, 1)
        #expect(word.isSet)
        write(bus, SensorBlock.controlOffset, 0)
        #expect(!word.isSet)
        #expect(drains.load(ordering: .relaxed) == 2, "every CONTROL write drains the ring first")
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

/// The sensor block for VMMKitTesting's fast-path harness: vCPU 0 polls STATUS, writes DATA and reads COUNT;
/// vCPU 1 (with two vCPUs) disables, enables and resets the block between any two of its steps.
struct SensorSubject: FastPathSubject {
    func make() -> SensorBlock { SensorBlock() }
    func connect(_ d: SensorBlock, drain: @escaping @Sendable () -> Void) { d.setRingDrain(drain) }
    var requests: [FastPathRequest] {
        [FastPathRequest(offset: SensorBlock.statusOffset, size: 4, direction: .read),
         FastPathRequest(offset: SensorBlock.dataOffset, size: 4, direction: .write, ring: 0),
         FastPathRequest(offset: SensorBlock.countOffset, size: 4, direction: .read)]
    }
    func finalProbe(_ d: SensorBlock) -> [UInt64] {
        [0x00, SensorBlock.statusOffset, SensorBlock.controlOffset, SensorBlock.countOffset, SensorBlock.hashOffset,
         SensorBlock.droppedOffset].map { d.read(offset: $0, size: 4) }
    }
    func access(vcpu: Int, _ rng: inout SplitMix64) -> GuestAccess {
        if vcpu == 1 {
            return GuestAccess(offset: SensorBlock.controlOffset, size: 4, direction: .write, value: UInt64.random(in: 0...3, using: &rng))
        }
        switch UInt64.random(in: 0..<10, using: &rng) {
        case 0: return GuestAccess(offset: SensorBlock.controlOffset, size: 4, direction: .write, value: 1)
        case 1...3: return GuestAccess(offset: SensorBlock.statusOffset, size: 4, direction: .read)
        case 4...7: return GuestAccess(offset: SensorBlock.dataOffset, size: 4, direction: .write, value: rng.next() & 0xffff_ffff)
        case 8: return GuestAccess(offset: SensorBlock.countOffset, size: 4, direction: .read)
        default: return GuestAccess(offset: SensorBlock.hashOffset, size: 4, direction: .read)
        }
    }
}

@Suite("SensorBlock's fast paths against the device (VMMKitTesting's FastPathHarness)")
struct SensorBlockPropertyTests {
    @Test("one vCPU (also program order) and two (the second one toggling CONTROL): served accesses agree with the device", arguments: [1, 2])
    func agree(vcpus: Int) {
        let r = FastPathHarness.check(SensorSubject(), seeds: 0..<200, options: FastPathHarnessOptions(vcpus: vcpus))
        #expect(r.failures.isEmpty, "\(r.failures.joined(separator: "\n"))")
        #expect(r.served > r.exited / 10, "the fast paths were exercised (\(r.served) served, \(r.exited) exits)")
        #expect(r.slotReads > 0, "COUNT was served from its slot")
    }

    @Test("the harness catches COUNT or (without the drain) STATUS served ahead of samples still in the ring, and ignored enable words")
    func faultsAreCaught() {
        let dependent = FastPathHarness.check(SensorSubject(), seeds: 0..<200,
                                              options: FastPathHarnessOptions(vcpus: 1, assumeIndependentReads: true))
        #expect(!dependent.failures.isEmpty, "COUNT served with samples still in the ring")
        // Without the drain before a CONTROL write, STATUS is not independent of the vCPU's own pending samples
        // (a disable from vCPU 1 drops a sample written before a READY read); serving it as if it were is caught.
        let undrained = FastPathHarness.check(SensorSubject(), seeds: 0..<200, options: FastPathHarnessOptions(
            vcpus: 2, assumeIndependentReads: true, connectRingDrain: false))
        #expect(!undrained.failures.isEmpty)
        let stale = FastPathHarness.check(SensorSubject(), seeds: 0..<200, options: FastPathHarnessOptions(vcpus: 2, ignoreEnableWords: true))
        #expect(!stale.failures.isEmpty, "samples appended while disabled would be taken")
    }
}

@Suite("VMMKit's public API, as a VMM of another package uses it")
struct PublicAPITests {
    @Test("the host CPUs this thread may use are known (for a VMM that checks them before going real-time)")
    func hostCPUs() {
        let cpus = VirtualMachine.allowedHostCPUs
        #expect(!cpus.isEmpty)
        #expect(cpus == cpus.sorted() && Set(cpus).count == cpus.count && cpus.allSatisfy { $0 >= 0 })
    }
}

import Testing
import VMMKit
import VMMKitTesting
#if canImport(Glibc)
import Glibc
#endif

/// A device that records the batches it receives; a write of `stopValue` stops the VM.
final class BatchSink: BusDevice, @unchecked Sendable {
    let name = "sink"
    var batches: [[UInt64]] = []
    var stopValue: UInt64?
    var values: [UInt64] { batches.flatMap { $0 } }
    func read(offset: UInt64, size: Int) -> UInt64 { 0 }
    func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect {
        batches.append([value])
        return value == stopValue ? .stopVM(status: UInt32(truncatingIfNeeded: value)) : .none
    }
    func writeBatch(offset: UInt64, size: Int, values: UnsafeBufferPointer<UInt64>) -> BatchWriteResult {
        var run: [UInt64] = []
        for (i, v) in values.enumerated() {
            run.append(v)
            if v == stopValue {
                batches.append(run)
                return BatchWriteResult(applied: i + 1, effect: .stopVM(status: UInt32(truncatingIfNeeded: v)))
            }
        }
        batches.append(run)
        return BatchWriteResult(applied: values.count, effect: .none)
    }
}

struct RingFixture {
    let memory: GuestMemory
    let ring: PVRingDevice
    let sink: BatchSink
    var header: GuestAddress { ring.header(0) }

    init(slots: UInt32 = 8, width: Int = 1, synchronous: Bool = false, stride: UInt64 = PVRingLayout.defaultStride) throws {
        memory = try GuestMemory(size: 32 << 20)
        let bus = IOBus()
        sink = BatchSink()
        try bus.attach(sink, ports: 0x3f8..<0x3f9)
        ring = try PVRingDevice(memory: memory, bus: bus, stride: stride,
                                targets: [PVRingTarget(space: .pio, address: 0x3f8, width: width, synchronous: synchronous)],
                                slotCount: slots)
    }

    func producer() throws -> RingProducerModel { try RingProducerModel(memory: memory, header: header) }
    func slotAddress(_ p: UInt64) -> GuestAddress {
        GuestAddress(header.rawValue + PVRingLayout.slotsOffset + (p & UInt64(ring.slotCount - 1)) * 8)
    }
    func hint() throws -> UInt64 { try memory.read(at: header) }
    func setHint(_ v: UInt64) throws { try memory.write(v, at: header) }
    func consumerWord() throws -> UInt64 { try memory.read(at: GuestAddress(header.rawValue + PVRingLayout.consumerOffset)) }
    func setPollingFlag(_ on: Bool) throws {
        let a = GuestAddress(header.rawValue + PVRingLayout.flagsOffset)
        let f: UInt32 = try memory.read(at: a)
        try memory.write(on ? f | PVRingLayout.pollingFlag : f & ~PVRingLayout.pollingFlag, at: a)
    }
}

@Suite("Paravirtual ring v2")
struct RingTests {
    @Test("the header and the free slots are initialised; a v1 magic is gone")
    func header() throws {
        let f = try RingFixture(slots: 8, width: 4, synchronous: true)
        let h = f.header.rawValue
        #expect(try f.memory.read(UInt32.self, at: GuestAddress(h + PVRingLayout.magicOffset)) == PVRingLayout.magic)
        #expect(try f.memory.read(UInt32.self, at: GuestAddress(h + 12)) != 0x474E_4952, "a v1 guest's magic check fails")
        #expect(try f.memory.read(UInt32.self, at: GuestAddress(h + PVRingLayout.slotCountOffset)) == 8)
        #expect(try f.memory.read(UInt32.self, at: GuestAddress(h + PVRingLayout.widthOffset)) == 4)
        #expect(try f.memory.read(UInt32.self, at: GuestAddress(h + PVRingLayout.flagsOffset)) == PVRingLayout.synchronousFlag)
        for p in 0..<8 as Range<UInt64> {
            #expect(try f.memory.read(UInt64.self, at: f.slotAddress(p)) == p, "slot \(p) free for position \(p)")
        }
        #expect(try f.hint() == 0)
    }

    @Test("published entries are applied in order, in batches, across wrap-around; slots are freed for the next lap")
    func inOrder() throws {
        let f = try RingFixture(slots: 8)
        let prod = try f.producer()
        for round in 0..<3 {
            for i in 0..<6 { #expect(prod.push(UInt32(round * 10 + i)) == .published) }
            #expect(f.ring.hasPending())
            #expect(f.ring.drain() == nil)
            #expect(!f.ring.hasPending())
        }
        #expect(f.sink.values == (0..<3).flatMap { r in (0..<6).map { UInt64(r * 10 + $0) } })
        #expect(f.sink.batches.count >= 3 && f.sink.batches.count <= 6, "one or two runs per drain (wrap-around)")
        #expect(try f.consumerWord() == 18 && f.ring.consumerIndex(ring: 0) == 18, "consumer index published")
        #expect(try f.memory.read(UInt64.self, at: f.slotAddress(17)) == 17 + 8, "consumed slot freed as (p + count, 0)")
    }

    @Test("a drain hands the device at most maximumBatch entries at once, in order, each batch freed before the next")
    func batchLimit() throws {
        let f = try RingFixture(slots: 2048, stride: StandardDevices.ringStride(slotCount: 2048))
        let prod = try f.producer()
        let published = (0..<1500).filter { prod.push(UInt32($0 & 0xff)) == .published }.count
        #expect(published == 1500)
        #expect(f.ring.drain() == nil)
        #expect(f.sink.batches.map(\.count) == [512, 512, 476])
        #expect(f.sink.values == (0..<1500).map { UInt64($0 & 0xff) })
        #expect(f.ring.consumerIndex(ring: 0) == 1500)
        #expect(!f.ring.hasPending())
    }

    @Test("the standard rings: 512 slots at the default stride, larger rings spaced to fit, up to 32,768; more refused")
    func standardRingSizes() throws {
        #expect(StandardDevices.ringStride(slotCount: 512) == PVRingLayout.defaultStride)
        #expect(StandardDevices.ringStride(slotCount: 4096) == 0x9000, "128 + 32,768 bytes, whole pages")
        #expect(StandardDevices.ringStride(slotCount: StandardDevices.maximumRingSlotCount) == 0x41000)
        for slots: UInt32 in [512, 4096, StandardDevices.maximumRingSlotCount] {
            let vm = try makeVM(MockHypervisor(), memory: 32 << 20)
            let devices = try StandardDevices.install(on: vm, console: CapturedOutput().sink(), ringPolling: .disabled,
                                                      ringSlotCount: slots)
            #expect(devices.rings.slotCount == slots)
            #expect(devices.rings.header(0) == X86Layout.ringArea.start, "the UART's ring stays where the guests look")
            #expect(devices.rings.header(1).rawValue == X86Layout.ringArea.start.rawValue + StandardDevices.ringStride(slotCount: slots))
            #expect(try vm.memory.read(UInt32.self, at: GuestAddress(devices.rings.header(1).rawValue + PVRingLayout.slotCountOffset)) == slots)
        }
        let vm = try makeVM(MockHypervisor(), memory: 32 << 20)
        #expect(throws: VMError.self) {
            _ = try StandardDevices.install(on: vm, console: CapturedOutput().sink(), ringSlotCount: StandardDevices.maximumRingSlotCount * 2)
        }
    }

    @Test("extra ring targets: rings 2, 3, ... for a VMM's own registers, applied by the same consumer; too many refused")
    func standardExtraRings() throws {
        let vm = try makeVM(MockHypervisor(), memory: 32 << 20)
        let sink = BatchSink()
        try vm.bus.attach(sink, mmio: GuestRange(start: GuestAddress(0xD010_0000), size: 0x1000))
        let devices = try StandardDevices.install(on: vm, console: CapturedOutput().sink(), ringPolling: .disabled, extraRingTargets: [
            PVRingTarget(space: .mmio, address: 0xD010_000C, width: 4),
            PVRingTarget(space: .pio, address: 0x510, width: 2),
        ])
        #expect(devices.rings.targets.count == 4)
        #expect(devices.rings.ring(for: .pio, address: 0x3f8) == 0)
        #expect(devices.rings.ring(for: .mmio, address: 0xD010_000C) == 2)
        #expect(devices.rings.ring(for: .pio, address: 0x510) == 3)
        #expect(devices.rings.header(2).rawValue == X86Layout.ringArea.start.rawValue + 2 * PVRingLayout.defaultStride)
        let producer = try RingProducerModel(memory: vm.memory, header: devices.rings.header(2))
        for v: UInt32 in [0xAABB_CCDD, 1, 2] { #expect(producer.push(v) == .published) }
        #expect(devices.rings.drain() == nil)
        #expect(sink.values == [0xAABB_CCDD, 1, 2])
        // 32,768-slot rings (0x41000 bytes apart): three fit in the ring area, a fourth does not.
        let three = try StandardDevices.install(on: try makeVM(MockHypervisor(), memory: 32 << 20), console: CapturedOutput().sink(),
                                                ringPolling: .disabled, ringSlotCount: StandardDevices.maximumRingSlotCount,
                                                extraRingTargets: [PVRingTarget(space: .pio, address: 0x510)])
        #expect(three.rings.targets.count == 3)
        let big = try makeVM(MockHypervisor(), memory: 32 << 20)
        #expect(throws: VMError.self) {
            _ = try StandardDevices.install(on: big, console: CapturedOutput().sink(), ringPolling: .disabled,
                                            ringSlotCount: StandardDevices.maximumRingSlotCount,
                                            extraRingTargets: [PVRingTarget(space: .pio, address: 0x510),
                                                               PVRingTarget(space: .pio, address: 0x512)])
        }
    }

    @Test("a full ring makes the producer fall back when no consumer polls; values are masked to the ring's width")
    func fullRing() throws {
        let f = try RingFixture(slots: 4, width: 1)
        let prod = try f.producer()
        for i in 0..<4 { #expect(prod.push(UInt32(0x100 + i)) == .published) }
        #expect(prod.push(9) == .fallback)
        #expect(prod.fullFallbacks == 1)
        f.ring.drain()
        #expect(f.sink.values == [0x00, 0x01, 0x02, 0x03], "masked to one byte")
        #expect(prod.push(9) == .published)
    }

    /// The steps of one uncontended push on an asynchronous ring.
    static let pushSteps = 6

    @Test("a producer stopped between any two of its steps never blocks the ring", arguments: 0...6)
    func stoppedProducer(stopAfter: Int) throws {
        for drainFirst in [false, true] {
            let f = try RingFixture(slots: 8)
            let stuck = try f.producer(), other = try f.producer()
            stuck.begin(0xAA)
            for _ in 0..<stopAfter { stuck.step() }
            let claimed = stopAfter >= 4 // readFlags, readHint, readSlot, claim: published from here on
            if drainFirst { f.ring.drain() }
            // Another producer fills the ring past the stuck one, several laps, with drains in between.
            var expected: [UInt64] = claimed ? [0xAA] : []
            for i in 0..<20 {
                #expect(other.push(UInt32(i)) == .published, "stopAfter \(stopAfter), drainFirst \(drainFirst), push \(i)")
                expected.append(UInt64(i))
                if i % 5 == 4 { f.ring.drain() }
            }
            f.ring.drain()
            #expect(f.sink.values == expected, "stopAfter \(stopAfter), drainFirst \(drainFirst)")
            // The stuck producer resumes: its value lands once (now, if it had not claimed a slot).
            let outcome = stuck.inProgress ? stuck.finish() : stuck.outcome
            #expect(outcome == .published)
            f.ring.drain()
            #expect(f.sink.values.filter { $0 == 0xAA }.count == 1)
            #expect(!f.ring.hasPending())
        }
    }

    @Test("two producers interleaved step by step in every pattern publish each value exactly once")
    func interleavings() throws {
        // Every 12-bit schedule: bit i picks which producer takes step i.
        for schedule in 0..<(1 << 12) {
            let f = try RingFixture(slots: 4)
            let a = try f.producer(), b = try f.producer()
            a.begin(1); b.begin(2)
            for i in 0..<12 { _ = (schedule >> i) & 1 == 0 ? a.step() : b.step() }
            _ = a.inProgress ? a.finish() : a.outcome
            _ = b.inProgress ? b.finish() : b.outcome
            f.ring.drain()
            #expect(f.sink.values.sorted() == [1, 2], "schedule \(schedule)")
        }
    }

    @Test("a free slot behind the hint is a hole: skipped, counted, later entries applied in order")
    func holes() throws {
        let f = try RingFixture(slots: 8)
        // A producer that moved the hint without publishing (or a stray hint write): positions 0 and 1 free.
        try f.setHint(2)
        let prod = try f.producer()
        #expect(prod.push(7) == .published)
        #expect(prod.push(8) == .published)
        #expect(f.ring.hasPending())
        f.ring.drain()
        #expect(f.sink.values == [7, 8])
        #expect(f.ring.statistics(ring: 0).holes == 2)
        #expect(f.ring.consumerIndex(ring: 0) == 4)
        #expect(try f.memory.read(UInt64.self, at: f.slotAddress(0)) == 8, "hole freed for the next lap")
        // A producer holding the stale position 0 cannot claim the healed slot.
        let stale = try f.memory.compareExchange(expected: 0, desired: PVRingLayout.slotWord(sequence: 1, value: 5), at: f.slotAddress(0))
        #expect(!stale.exchanged)
    }

    @Test("hostile ring words never crash, hang or apply garbage out of order (fixed seed)")
    func hostileWords() throws {
        var rng = SplitMix(seed: 0x5EED_0001)
        for trial in 0..<400 {
            let f = try RingFixture(slots: 8)
            let prod = try f.producer()
            for _ in 0..<(rng.next() % 12) {
                let p = rng.next() % 8
                let word: UInt64
                switch rng.next() % 4 {
                case 0: word = PVRingLayout.slotWord(sequence: UInt32(truncatingIfNeeded: p + 1), value: UInt32(truncatingIfNeeded: rng.next()))
                case 1: word = PVRingLayout.slotWord(sequence: UInt32(truncatingIfNeeded: p), value: UInt32(truncatingIfNeeded: rng.next()))
                default: word = rng.next()
                }
                try f.memory.write(word, at: f.slotAddress(p))
            }
            let hint: UInt64 = switch rng.next() % 4 {
            case 0: rng.next()
            case 1: rng.next() % 16
            case 2: UInt64.max - rng.next() % 4
            default: 0
            }
            try f.setHint(hint)
            try f.memory.write(UInt32(truncatingIfNeeded: rng.next()), at: GuestAddress(f.header.rawValue + PVRingLayout.slotCountOffset))
            for _ in 0..<3 { f.ring.drain() }
            let consumed = f.ring.consumerIndex(ring: 0)
            #expect(f.sink.values.count == Int(consumed) - f.ring.statistics(ring: 0).holes, "trial \(trial)")
            #expect(consumed <= 3 * 2 * 8, "bounded work per drain (trial \(trial))")
            // A well-behaved producer afterwards either publishes or falls back; it never hangs.
            _ = prod.push(1)
            f.ring.drain()
        }
    }

    @Test("an entry that stops the VM is the last one applied")
    func stopEntry() throws {
        let f = try RingFixture(slots: 8)
        f.sink.stopValue = 3
        let prod = try f.producer()
        for v in 1...5 { prod.push(UInt32(v)) }
        #expect(f.ring.drain() == .guestExit(status: 3))
        #expect(f.sink.values == [1, 2, 3])
        #expect(f.ring.drain() == nil)
        #expect(f.sink.values == [1, 2, 3], "nothing after the stopping entry, even on the next drain")
        #expect(f.ring.consumerIndex(ring: 0) == 3)
    }

    @Test("a synchronous append waits until the consumer index passes it; with no poller it falls back")
    func synchronous() throws {
        let f = try RingFixture(slots: 8, width: 4, synchronous: true)
        let prod = try f.producer()
        #expect(prod.push(1) == .fallback, "synchronous and nobody polls: the original access")
        try f.setPollingFlag(true)
        prod.begin(0xDEAD_BEEF)
        while prod.nextStep != .readConsumer && prod.step() {}
        #expect(prod.nextStep == .readConsumer)
        for _ in 0..<10 { prod.step() }
        #expect(prod.inProgress, "still waiting: not applied yet")
        f.ring.drain()
        #expect(prod.finish() == .published)
        #expect(f.sink.values == [0xDEAD_BEEF])
        #expect(f.ring.consumerIndex(ring: 0) == 1)
    }

    @Test("a drain in progress on another thread makes the lock-free check fire")
    func drainInProgress() throws {
        let memory = try GuestMemory(size: 32 << 20)
        let bus = IOBus()
        let gate = Gate()
        try bus.attach(gate, ports: 0x3f8..<0x3f9)
        let ring = try PVRingDevice(memory: memory, bus: bus, targets: [PVRingTarget(space: .pio, address: 0x3f8)], slotCount: 8)
        let prod = try RingProducerModel(memory: memory, header: ring.header(0))
        prod.push(1)
        let t = TestThread { ring.drain() }
        gate.waitEntered()
        #expect(ring.hasPending(), "the device holds the batch: an exit now must wait for it")
        gate.release()
        t.join()
        #expect(!ring.hasPending())
        #expect(gate.values == [1])
    }

    @Test("a bad layout is refused")
    func layout() throws {
        let m = try GuestMemory(size: 32 << 20)
        let t = [PVRingTarget(space: .pio, address: 0)]
        #expect(throws: PVRingError.self) { _ = try PVRingDevice(memory: m, bus: IOBus(), targets: t, slotCount: 3) }
        #expect(throws: PVRingError.self) { _ = try PVRingDevice(memory: m, bus: IOBus(), targets: t, slotCount: 1) }
        #expect(throws: PVRingError.self) { _ = try PVRingDevice(memory: m, bus: IOBus(), targets: t, slotCount: 1024) }
        #expect(throws: PVRingError.self) { _ = try PVRingDevice(memory: m, bus: IOBus(), targets: [PVRingTarget(space: .pio, address: 0, width: 8)]) }
        let small = try GuestMemory(size: 2 << 20)
        #expect(throws: PVRingError.self) { _ = try PVRingDevice(memory: small, bus: IOBus(), targets: t) }
    }

    @Test("guest memory's atomic words: aligned only, compare-exchange semantics")
    func sharedWords() throws {
        let m = try GuestMemory(size: 1 << 20)
        #expect(throws: GuestMemoryError.misaligned(GuestAddress(4), alignment: 8)) { _ = try m.sharedWord(at: GuestAddress(4)) }
        try m.storeRelease(UInt64(5), at: GuestAddress(8))
        let failed = try m.compareExchange(expected: 4, desired: 9, at: GuestAddress(8))
        #expect(!failed.exchanged && failed.original == 5)
        let done = try m.compareExchange(expected: 5, desired: 9, at: GuestAddress(8))
        #expect(done.exchanged && done.original == 5)
        #expect(try m.loadAcquire(UInt64.self, at: GuestAddress(8)) == 9)
    }
}

@Suite("Batched delivery")
struct BatchDeliveryTests {
    @Test("the UART takes a run of THR writes at once, in order; with DLAB set each write goes to the divisor latch")
    func uartBatch() throws {
        let out = CapturedOutput()
        let uart = UART8250(sink: out.sink())
        let bytes: [UInt64] = Array("hello\nworld".utf8).map { UInt64($0) | 0x100 }
        let r = bytes.withUnsafeBufferPointer { uart.writeBatch(offset: 0, size: 1, values: $0) }
        #expect(r == BatchWriteResult(applied: bytes.count, effect: .none))
        #expect(out.text == "hello\nworld", "the run held a newline: flushed whole, in order")
        _ = [UInt64(0x21)].withUnsafeBufferPointer { uart.writeBatch(offset: 0, size: 1, values: $0) }
        #expect(out.text == "hello\nworld", "no newline: buffered")
        uart.flush()
        #expect(out.text == "hello\nworld!")
        #expect(uart.transmitted == bytes.count + 1)
        _ = uart.write(offset: 3, size: 1, value: 0x80) // DLAB
        let r2 = [UInt64(0x01), 0x02].withUnsafeBufferPointer { uart.writeBatch(offset: 0, size: 1, values: $0) }
        #expect(r2.applied == 2)
        #expect(uart.read(offset: 0, size: 1) == 0x02, "divisor latch low byte holds the last value")
        #expect(uart.transmitted == bytes.count + 1)
    }

    @Test("the default batch stops after a write that stops the VM; the bus clamps a device's count")
    func defaultBatch() throws {
        let bus = IOBus()
        try bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        let r = [UInt64(7), 8, 9].withUnsafeBufferPointer { bus.writeBatch(.pio, address: 0xf4, size: 4, values: $0) }
        #expect(r == BatchWriteResult(applied: 1, effect: .stopVM(status: 7)))
        let none = [UInt64(1)].withUnsafeBufferPointer { bus.writeBatch(.pio, address: 0x999, size: 1, values: $0) }
        #expect(none == nil)
    }
}

@Suite("Paravirtual rings in a running VM")
struct RingVMTests {
    /// Publishes `text` into ring 0 (the UART) as a guest producer would.
    func publish(_ text: String, _ devices: StandardDevices, _ vm: VirtualMachine) throws {
        let prod = try RingProducerModel(memory: vm.memory, header: devices.rings.header(0))
        for b in text.utf8 { #expect(prod.push(UInt32(b)) == .published) }
    }

    @Test("an exiting access lands after the entries published before it", arguments: [false, true])
    func exitOrdering(polling: Bool) throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock, memory: 32 << 20)
        let console = CapturedOutput()
        let devices = try StandardDevices.install(on: vm, console: console.sink(), ringPolling: polling ? .enabled() : .disabled)
        try publish("ab", devices, vm)
        mock.vcpu(0)?.script([out(0x3f8, UInt64(UInt8(ascii: "Z"))), debugExit3])
        #expect(try vm.run() == .guestExit(status: 3))
        #expect(console.text == "abZ")
    }

    @Test("a producer's fallback is counted by what it found: the ring full, or not; a kick is counted apart")
    func fallbackCounters() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock, memory: 32 << 20)
        let console = CapturedOutput()
        let devices = try StandardDevices.install(on: vm, console: console.sink(), ringPolling: .disabled, ringSlotCount: 4)
        // A THR write before any ring carried an entry is the guest using the UART: no fallback.
        mock.vcpu(0)?.script([out(0x3f8, UInt64(UInt8(ascii: "A"))), .exit(.halt)])
        _ = try vm.run()
        #expect(devices.rings.statistics(ring: 0).fallbacks == 0)
        // Four entries fill the ring; the fifth byte goes to THR: a fallback that found the ring full.
        try publish("bcde", devices, vm)
        mock.vcpu(0)?.script([out(0x3f8, UInt64(UInt8(ascii: "F"))), out(0x3f8, UInt64(UInt8(ascii: "G"))),
                              out(StandardDevices.ringKickPort, 1), debugExit3])
        #expect(try vm.run() == .guestExit(status: 3))
        #expect(console.text == "AbcdeFG")
        let s = devices.rings.statistics(ring: 0)
        #expect(s.fallbacks == 2, "F and G")
        #expect(s.fallbacksRingFull == 1, "F found the ring full; G found it drained")
        #expect(s.fallbacksConsumerIdle == 0, "no poller is configured: nothing idles")
        #expect(devices.rings.kicks == 1)
    }

    @Test("producers detached: a target write is the guest's own again once the rings are drained; attached again: a fallback")
    func producersDetached() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock, memory: 32 << 20)
        let console = CapturedOutput()
        let devices = try StandardDevices.install(on: vm, console: console.sink(), ringPolling: .disabled, ringSlotCount: 4)
        devices.rings.producerAttached()
        // Entries left pending when the producers go: the detach waits for the drain that applies them.
        try publish("ab", devices, vm)
        devices.rings.producersDetached()
        mock.vcpu(0)?.script([out(0x3f8, UInt64(UInt8(ascii: "C"))), out(0x3f8, UInt64(UInt8(ascii: "D"))), .exit(.halt)])
        _ = try vm.run()
        #expect(console.text == "abCD")
        // C drained "ab" first (a fallback: the rings had carried entries); D found nothing pending and no producer.
        #expect(devices.rings.statistics(ring: 0).fallbacks == 1)
        devices.rings.producerAttached()
        mock.vcpu(0)?.script([out(0x3f8, UInt64(UInt8(ascii: "E"))), debugExit3])
        #expect(try vm.run() == .guestExit(status: 3))
        #expect(console.text == "abCDE")
        #expect(devices.rings.statistics(ring: 0).fallbacks == 2, "E is a producer's fallback again")
    }

    @Test("the drain timer delivers ring entries while the vCPU never exits (no poller)")
    func timerDrains() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock, memory: 32 << 20)
        let out = CapturedOutput()
        let devices = try StandardDevices.install(on: vm, console: out.sink(), ringPolling: .disabled)
        mock.vcpu(0)?.script([.spin])
        try vm.start()
        try publish("hi\n", devices, vm)
        var waited = 0
        while out.text != "hi\n" && waited < 400 { usleep(5_000); waited += 1 }
        #expect(out.text == "hi\n", "drained by the timer")
        vm.stop()
        #expect(try vm.wait() == .stopped)
    }

    @Test("the poller drains while the vCPU never exits, sets the header's polling flag, and stops with the VM")
    func poller() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock, memory: 32 << 20)
        let out = CapturedOutput()
        let devices = try StandardDevices.install(on: vm, console: out.sink(), ringPolling: .enabled(idleNanoseconds: 50_000_000))
        mock.vcpu(0)?.script([.spin])
        try vm.start()
        let flags = GuestAddress(devices.rings.header(0).rawValue + PVRingLayout.flagsOffset)
        var waited = 0
        while !devices.rings.isPolling && waited < 400 { usleep(1_000); waited += 1 }
        #expect(try vm.memory.read(UInt32.self, at: flags) & PVRingLayout.pollingFlag != 0)
        try publish("poll\n", devices, vm)
        waited = 0
        while out.text != "poll\n" && waited < 400 { usleep(1_000); waited += 1 }
        #expect(out.text == "poll\n")
        vm.stop()
        #expect(try vm.wait() == .stopped)
        #expect(!devices.rings.isPolling)
        #expect(try vm.memory.read(UInt32.self, at: flags) & PVRingLayout.pollingFlag == 0, "flag cleared when the poller ends")
        #expect(devices.rings.pollerCPUNanoseconds > 0, "the poller's CPU time is accounted")
    }

    @Test("an idle poller sleeps with the wake flag raised; a producer then kicks, the kick clears the flag and the poller polls again")
    func pollerWakeFlag() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock, memory: 32 << 20)
        let sink = BatchSink()
        try vm.bus.attach(sink, ports: 0x3f8..<0x3f9)
        let rings = try PVRingDevice(memory: vm.memory, bus: vm.bus, targets: [PVRingTarget(space: .pio, address: 0x3f8)],
                                     polling: .enabled(idleNanoseconds: 1_000_000))
        rings.attach(to: vm)
        mock.vcpu(0)?.script([.spin])
        try vm.start()
        let flags = GuestAddress(rings.header(0).rawValue + PVRingLayout.flagsOffset)
        func current() throws -> UInt32 { try vm.memory.read(UInt32.self, at: flags) }
        var waited = 0
        while ((try current()) & PVRingLayout.wakeFlag == 0 || rings.pollerSleeps == 0) && waited < 2_000 { usleep(1_000); waited += 1 }
        #expect(try current() == PVRingLayout.wakeFlag, "idle: not polling, wake flag raised")
        let sleeps = rings.pollerSleeps
        #expect(sleeps >= 1)
        let prod = try RingProducerModel(memory: vm.memory, header: rings.header(0))
        #expect(prod.push(7) == .kick, "the consumer sleeps: the producer kicks")
        // The kick (the kick register's write, after the exit drained the ring).
        rings.drain()
        rings.wakePoller()
        // The wake clears the flag under the poller's lock while it sleeps (at
        // once); if its 10 ms check found the entry first, it clears it itself.
        // A poller that woke, idled 1 ms and slept again between two looks raised the flag anew:
        // that counts as woken too (its sleep count moved).
        waited = 0
        while (try current()) & PVRingLayout.wakeFlag != 0 && rings.pollerSleeps == sleeps && waited < 2_000 {
            usleep(1_000); waited += 1
        }
        #expect(try current() & PVRingLayout.wakeFlag == 0 || rings.pollerSleeps > sleeps, "one kick is enough")
        #expect(sink.values == [7])
        // Nothing is pending any more, so only the kick can have woken it: it
        // polls again, and after its 1 ms idle period goes back to sleep.
        waited = 0
        while rings.pollerSleeps == sleeps && waited < 2_000 { usleep(1_000); waited += 1 }
        #expect(rings.pollerSleeps > sleeps, "the kick woke the poller")
        vm.stop()
        #expect(try vm.wait() == .stopped)
        #expect(try current() == 0, "no flags once the poller ends")
    }

    @Test("an entry that stops the VM from the poller is the last one applied, also at stop")
    func pollerStop() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock, memory: 32 << 20)
        let sink = BatchSink()
        sink.stopValue = 0x42
        try vm.bus.attach(sink, ports: 0x3f8..<0x3f9)
        let rings = try PVRingDevice(memory: vm.memory, bus: vm.bus, targets: [PVRingTarget(space: .pio, address: 0x3f8)],
                                     polling: .enabled())
        rings.attach(to: vm)
        mock.vcpu(0)?.script([.spin])
        try vm.start()
        let prod = try RingProducerModel(memory: vm.memory, header: rings.header(0))
        for v in [1, 0x42, 3] { prod.push(UInt32(v)) }
        #expect(try vm.wait() == .guestExit(status: 0x42))
        #expect(sink.values == [1, 0x42])
    }
}

/// A device whose batch blocks until released (to hold a drain in progress).
final class Gate: BusDevice, @unchecked Sendable {
    let name = "gate"
    private let lock = NSConditionLike()
    private var entered = false, open = false
    var values: [UInt64] = []
    func read(offset: UInt64, size: Int) -> UInt64 { 0 }
    func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect { .none }
    func writeBatch(offset: UInt64, size: Int, values v: UnsafeBufferPointer<UInt64>) -> BatchWriteResult {
        lock.run { entered = true }
        while !lock.run({ open }) { usleep(100) }
        values.append(contentsOf: v)
        return BatchWriteResult(applied: v.count, effect: .none)
    }
    func waitEntered() { while !lock.run({ entered }) { usleep(100) } }
    func release() { lock.run { open = true } }
}

/// A pthread mutex for the tests' small shared flags.
final class NSConditionLike: @unchecked Sendable {
    private var m = pthread_mutex_t()
    init() { pthread_mutex_init(&m, nil) }
    func run<R>(_ body: () -> R) -> R { pthread_mutex_lock(&m); defer { pthread_mutex_unlock(&m) }; return body() }
}

/// A joinable thread for tests.
final class TestThread: @unchecked Sendable {
    private var handle = pthread_t()
    private let body: () -> Void
    init(_ body: @escaping () -> Void) {
        self.body = body
        let u = Unmanaged.passRetained(self)
        pthread_create(&handle, nil, { arg in
            guard let arg else { return nil }
            let t = Unmanaged<TestThread>.fromOpaque(arg).takeRetainedValue()
            t.body()
            return nil
        }, u.toOpaque())
    }
    func join() { pthread_join(handle, nil) }
}

/// A small fixed-seed generator (SplitMix64), printed seeds make failures reproducible.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

import Dispatch
import Synchronization
import Testing
import VMMKit
import VMMKitTesting

@Suite("Fast-path contracts and the lock-light bus")
struct FastPathTests {
    @Test("UART LSR: the enable word follows the receive FIFO, overrun and loopback")
    func uartLineStatusWord() {
        let u = UART8250(sink: CapturedOutput().sink())
        let words = FastPathEnableWordStorage(count: 1)
        let lsr = words[0]
        let d = u.grantFastPath(FastPathRequest(offset: 5, size: 1, direction: .read), enableWord: lsr)
        #expect(d == FastPathDescription(kind: .constantRead(0x60), offset: 5, size: 1, direction: .read))
        #expect(d?.independentOfPendingRingEntries == false, "without a ring drain on loopback, pending THR entries may change LSR")
        #expect(lsr.isSet, "idle UART: LSR is 0x60")
        u.receive([0x41])
        #expect(!lsr.isSet, "input queued")
        #expect(u.read(offset: 0, size: 1) == 0x41)
        #expect(lsr.isSet, "FIFO empty again")
        u.receive(Array(repeating: 0x42, count: UART8250.fifoDepth + 1))
        for _ in 0..<UART8250.fifoDepth { _ = u.read(offset: 0, size: 1) }
        #expect(!lsr.isSet, "FIFO empty but the overrun is still pending")
        #expect(u.read(offset: 5, size: 1) == 0x62, "overrun reported once")
        #expect(lsr.isSet)
        _ = u.write(offset: 4, size: 1, value: 0x10)
        #expect(!lsr.isSet, "loopback on")
        _ = u.write(offset: 4, size: 1, value: 0x00)
        #expect(lsr.isSet)
        u.revokeFastPath(lsr)
        u.receive([1]); _ = u.read(offset: 0, size: 1)
        #expect(!lsr.isSet, "a revoked word is cleared and never set again")
    }

    @Test("UART with a ring drain: LSR independent of pending THR entries; loopback goes on only after a drain that runs with every word clear")
    func uartLoopbackDrainsFirst() {
        let u = UART8250(sink: CapturedOutput().sink())
        let words = FastPathEnableWordStorage(count: 2)
        let seen = Mutex<[[Bool]]>([])
        u.setRingDrain {
            // What a ring consumer does: apply the pending THR entry (loopback is still off: it transmits).
            seen.withLock { $0.append([words[0].isSet, words[1].isSet]) }
            _ = u.write(offset: 0, size: 1, value: 0x41)
        }
        let lsr = u.grantFastPath(FastPathRequest(offset: 5, size: 1, direction: .read), enableWord: words[0])
        _ = u.grantFastPath(FastPathRequest(offset: 0, size: 1, direction: .write, ring: 0), enableWord: words[1])
        #expect(lsr?.independentOfPendingRingEntries == true)
        #expect(words[0].isSet && words[1].isSet)
        _ = u.write(offset: 4, size: 1, value: 0x10)
        #expect(seen.withLock { $0 } == [[false, false]], "the drain ran once, with both words clear")
        #expect(u.transmitted == 1, "the pending entry transmitted before loopback went on")
        #expect(u.read(offset: 5, size: 1) == 0x60, "nothing landed in the receive FIFO")
        #expect(!words[0].isSet && !words[1].isSet, "loopback on")
        _ = u.write(offset: 4, size: 1, value: 0x10)
        #expect(seen.withLock { $0.count } == 1, "loopback already on: no drain")
        _ = u.write(offset: 4, size: 1, value: 0)
        #expect(words[0].isSet && words[1].isSet)
    }

    @Test("UART THR: a ring append only with a ring, while DLAB is clear, loopback off and the THRE interrupt disabled")
    func uartTransmitWord() {
        let u = UART8250(sink: CapturedOutput().sink())
        let words = FastPathEnableWordStorage(count: 1)
        let thr = words[0]
        #expect(u.grantFastPath(FastPathRequest(offset: 0, size: 1, direction: .write), enableWord: thr) == nil,
                "no ring feeds the register: no ring append")
        #expect(u.grantFastPath(FastPathRequest(offset: 0, size: 2, direction: .write, ring: 3), enableWord: thr) == nil)
        let d = u.grantFastPath(FastPathRequest(offset: 0, size: 1, direction: .write, ring: 3), enableWord: thr)
        #expect(d?.kind == .ringAppend(ring: 3, mode: .asynchronous))
        #expect(thr.isSet)
        for (offset, on, off) in [(UInt64(3), UInt64(0x83), UInt64(0x03)), (4, 0x10, 0x00), (1, 0x02, 0x01)] {
            _ = u.write(offset: offset, size: 1, value: on)
            #expect(!thr.isSet, "register \(offset) = \(on) breaks the precondition")
            _ = u.write(offset: offset, size: 1, value: off)
            #expect(thr.isSet, "register \(offset) = \(off) restores it")
        }
        u.receive([1, 2, 3])
        #expect(thr.isSet, "received input does not affect transmit")
    }

    @Test("UART: reads with side effects and other registers get no fast path")
    func uartDeclines() {
        let u = UART8250(sink: CapturedOutput().sink())
        let w = FastPathEnableWordStorage(count: 1)[0]
        for offset: UInt64 in [0, 1, 2, 3, 4, 6, 7] {
            #expect(u.grantFastPath(FastPathRequest(offset: offset, size: 1, direction: .read, ring: 0), enableWord: w) == nil,
                    "read of register \(offset)")
        }
        #expect(u.grantFastPath(FastPathRequest(offset: 5, size: 2, direction: .read), enableWord: w) == nil)
        #expect(u.grantFastPath(FastPathRequest(offset: 3, size: 1, direction: .write, ring: 0), enableWord: w) == nil)
        #expect(!w.isSet)
    }

    @Test("doorbell: a synchronous ring append, exact while enabled with a valid queue size")
    func doorbellWord() throws {
        let m = try GuestMemory(size: 1 << 20)
        let d = DoorbellDevice(memory: m)
        let w = FastPathEnableWordStorage(count: 1)[0]
        #expect(d.grantFastPath(FastPathRequest(offset: 0x40, size: 4, direction: .write), enableWord: w) == nil)
        let g = d.grantFastPath(FastPathRequest(offset: 0x40, size: 4, direction: .write, ring: 1), enableWord: w)
        #expect(g?.kind == .ringAppend(ring: 1, mode: .synchronous))
        #expect(!w.isSet, "disabled")
        _ = d.write(offset: 0x08, size: 4, value: 0x8000)
        _ = d.write(offset: 0x10, size: 4, value: 4)
        _ = d.write(offset: 0x14, size: 4, value: 1)
        #expect(w.isSet)
        _ = d.write(offset: 0x10, size: 4, value: 3)
        #expect(!w.isSet, "not a power of two")
        _ = d.write(offset: 0x10, size: 4, value: 8)
        #expect(w.isSet)
        _ = d.write(offset: 0x14, size: 4, value: 0)
        #expect(!w.isSet)
        #expect(d.grantFastPath(FastPathRequest(offset: 0x04, size: 4, direction: .read, ring: 1), enableWord: w) == nil)
    }

    @Test("doorbell: a queue at the top of the address space is an error, not a trap")
    func doorbellTopOfAddressSpace() throws {
        let d = DoorbellDevice(memory: try GuestMemory(size: 1 << 20))
        _ = d.write(offset: 0x08, size: 4, value: 0xffff_fffc)
        _ = d.write(offset: 0x0c, size: 4, value: 0xffff_ffff)
        _ = d.write(offset: 0x10, size: 4, value: 1)
        _ = d.write(offset: 0x14, size: 4, value: 1)
        _ = d.write(offset: 0x40, size: 4, value: 7)
        #expect(d.error == 2 && d.completions == 0)
    }

    @Test("port 0x80: writes are discarded, always exact; the standard platform has it")
    func postCode() throws {
        let p = PostCodePort()
        let w = FastPathEnableWordStorage(count: 1)[0]
        #expect(p.grantFastPath(FastPathRequest(offset: 0, size: 1, direction: .write), enableWord: w)?.kind == .discardWrite)
        #expect(w.isSet)
        #expect(p.read(offset: 0, size: 1) == 0xff)
        #expect(p.grantFastPath(FastPathRequest(offset: 0, size: 1, direction: .read), enableWord: w) == nil)
        p.revokeFastPath(w)
        #expect(!w.isSet)
        #expect(DebugExitDevice().grantFastPath(FastPathRequest(offset: 0, size: 1, direction: .write), enableWord: w) == nil,
                "a debug-exit write stops the VM: no fast path")

        let vm = try makeVM(MockHypervisor(), memory: 32 << 20)
        let devices = try StandardDevices.install(on: vm, console: CapturedOutput().sink())
        #expect(vm.bus.device(at: 0x80, space: .pio)?.device === devices.postCode)
        let g = try vm.bus.grantFastPath(space: .pio, address: 0x80, size: 1, direction: .write, enableWord: w)
        #expect(g.description.kind == .discardWrite)
    }

    /// A device that answers every request with a fixed (possibly wrong) description.
    final class Rogue: BusDevice, @unchecked Sendable {
        let name = "rogue"
        let answer: FastPathDescription
        var revoked: [FastPathEnableWord] = []
        init(_ answer: FastPathDescription) { self.answer = answer }
        func read(offset: UInt64, size: Int) -> UInt64 { 0 }
        func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect { .none }
        func grantFastPath(_ request: FastPathRequest, enableWord: FastPathEnableWord) -> FastPathDescription? {
            enableWord.store(true); return answer
        }
        func revokeFastPath(_ enableWord: FastPathEnableWord) { revoked.append(enableWord); enableWord.store(false) }
    }

    @Test("the bus refuses fast paths with a named reason")
    func refusals() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        let uart = UART8250(sink: CapturedOutput().sink())
        try vm.bus.attach(uart, ports: 0x3f8..<0x400)
        let w = FastPathEnableWordStorage(count: 1)[0]
        func refusal(_ address: UInt64, _ size: Int, _ dir: AccessDirection, ring: Int? = nil, space: BusSpace = .pio) -> FastPathRefusal? {
            do { _ = try vm.bus.grantFastPath(space: space, address: address, size: size, direction: dir, ring: ring, enableWord: w); return nil }
            catch { return error }
        }
        #expect(refusal(0x3fd, 1, .read) == nil)
        for size in [0, 3, 9, 16, 255] { #expect(refusal(0x3fd, size, .read) == .unsupportedSize(size)) }
        #expect(refusal(0x500, 1, .read) == .unclaimed)
        #expect(refusal(0x3ff, 2, .read) == .crossesRangeEnd)
        #expect(refusal(0x3fa, 1, .read) == .declined(device: "uart"), "IIR read has side effects")
        #expect(refusal(0x3f8, 1, .read) == .declined(device: "uart"), "RBR read has side effects")
        #expect(refusal(0x3fe, 1, .read) == .declined(device: "uart"), "MSR read")
        #expect(refusal(0x3f8, 1, .write) == .declined(device: "uart"), "no ring feeds THR")
        #expect(refusal(0x3f8, 1, .write, ring: 0) == nil)

        try vm.registerCoalescedZone(CoalescedZone(address: 0x3f8, size: 1, isPIO: true))
        #expect(refusal(0x3f8, 1, .write, ring: 0) == .kernelHandled(.coalescedZone))
        #expect(refusal(0x3fd, 1, .read) == nil, "outside the zone")
        try vm.registerIOEventFD(IOEventFD(address: 0xd000_0040, length: 4, fd: -1, isPIO: false))
        try vm.bus.attach(DoorbellDevice(memory: vm.memory), mmio: GuestRange(start: GuestAddress(0xd000_0000), size: 0x1000))
        #expect(refusal(0xd000_0040, 4, .write, ring: 1, space: .mmio) == .kernelHandled(.ioeventfd))
        #expect(vm.bus.kernelHandling(space: .mmio, address: 0xd000_0040, size: 4) == .ioeventfd)
        #expect(throws: VMError.self) { try vm.registerCoalescedZone(CoalescedZone(address: 0x500, size: 0, isPIO: true)) }
        #expect(!mock.log.calls.contains { $0.operation == .registerCoalescedMMIO && $0.detail == "0x500" },
                "an empty zone is refused before the kernel sees it")

        let wrong: [FastPathDescription] = [
            FastPathDescription(kind: .discardWrite, offset: 1, size: 1, direction: .write),
            FastPathDescription(kind: .constantRead(0), offset: 0, size: 1, direction: .write),
            FastPathDescription(kind: .ringAppend(ring: 7, mode: .asynchronous), offset: 0, size: 1, direction: .write),
            FastPathDescription(kind: .discardWrite, offset: 0, size: 2, direction: .write),
        ]
        for (i, d) in wrong.enumerated() {
            let rogue = Rogue(d)
            try vm.bus.attach(rogue, ports: UInt16(0x600 + i)..<UInt16(0x601 + i))
            #expect(refusal(UInt64(0x600 + i), 1, .write, ring: 0) == .invalidDeclaration(device: "rogue"))
            #expect(rogue.revoked == [w] && !w.isSet, "an invalid grant is revoked at once")
        }
    }

    @Test("a range the kernel takes over later revokes the fast paths granted there, and only those")
    func kernelTakeoverRevokes() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        try vm.bus.attach(UART8250(sink: CapturedOutput().sink()), ports: 0x3f8..<0x400)
        let words = FastPathEnableWordStorage(count: 2)
        let thr = words[0], lsr = words[1]
        _ = try vm.bus.grantFastPath(space: .pio, address: 0x3f8, size: 1, direction: .write, ring: 0, enableWord: thr)
        _ = try vm.bus.grantFastPath(space: .pio, address: 0x3fd, size: 1, direction: .read, enableWord: lsr)
        #expect(thr.isSet && lsr.isSet)
        try vm.registerIOEventFD(IOEventFD(address: 0x3f8, length: 1, fd: -1, isPIO: true))
        #expect(!thr.isSet, "the kernel now handles THR writes: the stub must exit")
        #expect(lsr.isSet, "LSR is outside the new range")
        _ = vm.bus.write(.pio, address: 0x3fb, size: 1, value: 0x03)
        #expect(!thr.isSet, "a revoked word stays clear when the device refreshes its words")
    }

    @Test("TSC counters: offset and wrap mask, product at 128 bits")
    func tscCounter() {
        // A 24-bit PM timer (3.579545 MHz) from a 2 GHz TSC: multiplier = 3579545 << 32 / 2e9.
        let m = UInt64((Double(3_579_545) / 2e9 * 4_294_967_296).rounded())
        let c = TSCCounter(multiplier: m, shift: 32, offset: 0x123, wrapMask: 0xff_ffff)
        for tsc: UInt64 in [0, 1, 2_000_000_000, 1 << 40, .max] {
            let p = tsc.multipliedFullWidth(by: m)
            let expected = ((p.low >> 32) | (p.high << 32)) &+ 0x123
            #expect(c.value(tsc: tsc) == expected & 0xff_ffff, "tsc \(tsc)")
        }
        #expect(TSCCounter(multiplier: 1, shift: 0).value(tsc: 77) == 77)
        #expect(TSCCounter(multiplier: .max, shift: 64).value(tsc: .max) == UInt64.max - 1)
        #expect(TSCCounter(multiplier: .max, shift: 200).value(tsc: .max) == 1, "shift clamps at 127")
        #expect(FastPathKind.tscCounter(c).servesReads && !FastPathKind.discardWrite.servesReads)
    }

    @Test("enable words in guest memory: aligned, backed, shared by value")
    func guestEnableWord() throws {
        let m = try GuestMemory(size: 1 << 20)
        let w = try FastPathEnableWord(memory: m, at: GuestAddress(0x1000))
        #expect(throws: GuestMemoryError.self) { try FastPathEnableWord(memory: m, at: GuestAddress(0x1002)) }
        #expect(throws: GuestMemoryError.self) { try FastPathEnableWord(memory: m, at: GuestAddress(1 << 20)) }
        w.store(true)
        #expect(try m.read(UInt32.self, at: GuestAddress(0x1000)) == 1)
        #expect(w == (try FastPathEnableWord(memory: m, at: GuestAddress(0x1000))))
        w.store(false)
        #expect(try m.read(UInt32.self, at: GuestAddress(0x1000)) == 0)
    }

    @Test("widths: 0 and above 8 reach no device; 3, 5, 6, 7 are split into 1, 2, 4-byte pieces")
    func widths() throws {
        let bus = IOBus()
        let dev = RecordingDevice(readValue: 0x10)
        try bus.attach(dev, mmio: GuestRange(start: GuestAddress(0x1000), size: 0x100))
        for size in [0, 9, 16, 255, -1] {
            #expect(bus.read(.mmio, address: 0x1000, size: size) == nil)
            #expect(bus.write(.mmio, address: 0x1000, size: size, value: 1) == nil)
        }
        #expect(dev.reads.isEmpty && dev.writes.isEmpty)
        #expect(bus.refusedSizeCount == 10)
        #expect(bus.unclaimedCounts[UnclaimedAccess(space: .mmio, address: 0x1000, direction: .read)] == 5)
        // 7 bytes at 0x1008: 4 at +8, 2 at +12, 1 at +14; the device returns 0x10 + offset.
        #expect(bus.read(.mmio, address: 0x1008, size: 7) == 0x1e_001c_0000_0018)
        #expect(dev.reads.map(\.size) == [4, 2, 1] && dev.reads.map(\.offset) == [8, 12, 14])
        _ = bus.write(.mmio, address: 0x1000, size: 3, value: 0xaa_bbcc)
        #expect(dev.writes.map(\.size) == [2, 1] && dev.writes.map(\.value) == [0xbbcc, 0xaa])
        // A split piece past the range's end is unclaimed, and reads as all ones.
        #expect(bus.read(.mmio, address: 0x10fe, size: 3) == 0xff_010e)
        for size in [1, 2, 4, 8] { #expect(bus.read(.mmio, address: 0x1000, size: size) == 0x10) }
    }

    @Test("an MMIO exit of 16 bytes reaches no device and completes with all ones")
    func wideExit() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        let dev = RecordingDevice(readValue: 5)
        try vm.bus.attach(dev, mmio: GuestRange(start: GuestAddress(0xc000_0000), size: 0x1000))
        mock.vcpu(0)?.script([
            .exit(.mmio(MMIOAccess(address: GuestAddress(0xc000_0000), size: 16, direction: .read))),
            .exit(.mmio(MMIOAccess(address: GuestAddress(0xc000_0000), size: 0, direction: .write, value: 1))),
            .exit(.io(PortIO(port: 0x70, size: 9, direction: .write, value: 1))),
        ])
        _ = try vm.run()
        #expect(dev.reads.isEmpty && dev.writes.isEmpty)
        #expect(mock.vcpu(0)?.completedReads[0] == [0: .max])
        #expect(vm.bus.refusedSizeCount == 3)
    }

    @Test("attaching while other threads dispatch: readers never block and never see a wrong device")
    func attachWhileRunning() throws {
        let bus = IOBus()
        final class Fixed: BusDevice, @unchecked Sendable {
            let name = "fixed"; let value: UInt64
            init(_ v: UInt64) { value = v }
            func read(offset: UInt64, size: Int) -> UInt64 { value }
            func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect { .none }
        }
        let count = 300
        final class Counter: @unchecked Sendable { let n = Atomic<Int>(0); func add() { n.add(1, ordering: .relaxed) } }
        let wrong = Counter()
        DispatchQueue.concurrentPerform(iterations: 3) { worker in
            if worker == 0 {
                for i in 0..<count { try? bus.attach(Fixed(UInt64(i)), ports: UInt16(0x1000 + i)..<UInt16(0x1001 + i)) }
            } else {
                for round in 0..<20_000 {
                    let i = (round &* 7919 &+ worker) % count
                    if let v = bus.read(.pio, address: UInt64(0x1000 + i), size: 1), v != UInt64(i) { wrong.add() }
                }
            }
        }
        #expect(wrong.n.load(ordering: .relaxed) == 0)
        #expect(bus.attached.count == count)
        for i in [0, count / 2, count - 1] { #expect(bus.read(.pio, address: UInt64(0x1000 + i), size: 1) == UInt64(i)) }
    }

    @Test("host output is written outside the device's and the sink's locks")
    func outputOutsideLocks() {
        final class Box: @unchecked Sendable { var uart: UART8250?; var sink: OutputSink?; var lsr: [UInt64] = [] }
        let box = Box()
        let captured = CapturedOutput()
        let inner = captured.sink()
        let sink = OutputSink(capacity: 64) { chunk in
            // Re-entering the UART and the sink from the host write would deadlock under either lock.
            if let u = box.uart { box.lsr.append(u.read(offset: 5, size: 1)) }
            box.sink?.put(UInt8(ascii: "."))
            inner.put(contentsOf: chunk)
        }
        box.sink = sink
        let u = UART8250(sink: sink)
        box.uart = u
        for b in "hi\n".utf8 { _ = u.write(offset: 0, size: 1, value: UInt64(b)) }
        sink.flush(); inner.flush()
        #expect(captured.text == "hi\n.")
        #expect(box.lsr == [0x60, 0x60])
    }

    @Test("batches: the UART takes a run at once outside its lock; the default stops after a stop effect; odd widths go value by value")
    func batches() throws {
        let bus = IOBus()
        let captured = CapturedOutput()
        let sink = captured.sink()
        let uart = UART8250(sink: sink)
        try bus.attach(uart, ports: 0x3f8..<0x400)
        try bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        let dev = RecordingDevice()
        try bus.attach(dev, mmio: GuestRange(start: GuestAddress(0x1000), size: 0x100))
        let text: [UInt64] = "batched\n".utf8.map(UInt64.init)
        let r = text.withUnsafeBufferPointer { bus.writeBatch(.pio, address: 0x3f8, size: 1, values: $0) }
        #expect(r == BatchWriteResult(applied: text.count, effect: .none))
        #expect(captured.text == "batched\n" && uart.transmitted == text.count)
        _ = uart.write(offset: 3, size: 1, value: 0x83)
        let divisor: [UInt64] = [0x11, 0x22]
        _ = divisor.withUnsafeBufferPointer { bus.writeBatch(.pio, address: 0x3f8, size: 1, values: $0) }
        #expect(uart.read(offset: 0, size: 1) == 0x22, "DLAB set: the batch went to the divisor latch")
        let stops: [UInt64] = [3, 4, 5]
        #expect(stops.withUnsafeBufferPointer { bus.writeBatch(.pio, address: 0xf4, size: 4, values: $0) }
                == BatchWriteResult(applied: 1, effect: .stopVM(status: 3)))
        #expect(stops.withUnsafeBufferPointer { bus.writeBatch(.pio, address: 0x900, size: 1, values: $0) } == nil)
        #expect(bus.unclaimedCounts[UnclaimedAccess(space: .pio, address: 0x900, direction: .write)] == 3)
        #expect(stops.withUnsafeBufferPointer { bus.writeBatch(.mmio, address: 0x1000, size: 3, values: $0) }
                == BatchWriteResult(applied: 3, effect: .none))
        #expect(dev.writes.map(\.size) == [2, 1, 2, 1, 2, 1], "3-byte values split into 2 + 1")
    }

    @Test("a long run through the sink arrives whole and in order, in chunks of the buffer's size")
    func longRun() {
        final class Chunks: @unchecked Sendable { var sizes: [Int] = []; var bytes: [UInt8] = [] }
        let chunks = Chunks()
        let sink = OutputSink(capacity: 64) { c in chunks.sizes.append(c.count); chunks.bytes += c }
        let values = (0..<1000).map { UInt64($0 % 26 + 0x41) }
        values.withUnsafeBufferPointer { sink.put(lowBytesOf: $0) }
        sink.flush()
        #expect(chunks.bytes == values.map { UInt8($0) })
        #expect(chunks.sizes.allSatisfy { $0 <= 64 } && chunks.sizes.count == 16)
    }
}

import Testing
import VMMKit
import VMMKitTesting

// Property tests for the fast paths the built-in devices declare (DESIGN.md, DMP step 3), run by
// VMMKitTesting's FastPathHarness (its file says what it checks): the UART with a second vCPU
// flipping DLAB, loopback and IER, the doorbell with one reconfiguring it, port 0x80.

// MARK: - Subjects

/// A device that forwards every call to another, for subjects that keep more state beside it.
class Forwarding: BusDevice, @unchecked Sendable {
    let inner: any BusDevice
    init(_ inner: any BusDevice) { self.inner = inner }
    var name: String { inner.name }
    func read(offset: UInt64, size: Int) -> UInt64 { inner.read(offset: offset, size: size) }
    func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect { inner.write(offset: offset, size: size, value: value) }
    func grantFastPath(_ r: FastPathRequest, enableWord: FastPathEnableWord) -> FastPathDescription? {
        inner.grantFastPath(r, enableWord: enableWord)
    }
    func revokeFastPath(_ w: FastPathEnableWord) { inner.revokeFastPath(w) }
}

struct UARTSubject: FastPathSubject {
    final class Device: Forwarding, @unchecked Sendable {
        let uart: UART8250
        let captured: CapturedOutput
        let sink: OutputSink
        init() {
            let captured = CapturedOutput(), sink = captured.sink(), uart = UART8250(sink: sink)
            (self.captured, self.sink, self.uart) = (captured, sink, uart)
            super.init(uart)
        }
    }

    func make() -> Device { Device() }
    var requests: [FastPathRequest] {
        [FastPathRequest(offset: 5, size: 1, direction: .read), FastPathRequest(offset: 0, size: 1, direction: .write, ring: 0)]
    }

    func hostAction(_ rng: inout SplitMix64) -> ((Device) -> Void)? {
        let n = Int.random(in: 0..<8, using: &rng) == 0 ? UART8250.fifoDepth + 2 : Int.random(in: 1...3, using: &rng)
        let bytes = (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
        return { $0.uart.receive(bytes) }
    }

    func observe(_ d: Device) -> [UInt64] { d.sink.flush(); return d.captured.data.map(UInt64.init) }
    func memoryRead(_ d: Device) -> UInt64? { nil }
    func connect(_ d: Device, drain: @escaping @Sendable () -> Void) { d.uart.setRingDrain(drain) }

    func finalProbe(_ d: Device) -> [UInt64] {
        var r = [1, 3, 4, 7, 6, 5, 2, 2].map { d.read(offset: $0, size: 1) }
        for _ in 0..<(UART8250.fifoDepth + 1) { r.append(d.read(offset: 0, size: 1)) }
        _ = d.write(offset: 3, size: 1, value: 0x80)
        r += [d.read(offset: 0, size: 1), d.read(offset: 1, size: 1)]
        return r
    }

    func access(vcpu: Int, _ rng: inout SplitMix64) -> GuestAccess {
        let x = Int.random(in: 0..<100, using: &rng)
        let byte = UInt64.random(in: 0...255, using: &rng)
        if vcpu == 0 {
            // A driver: poll LSR, transmit, now and then read input or touch other registers.
            switch x {
            case 0..<40: return GuestAccess(offset: 5, size: 1, direction: .read)
            case 40..<80: return GuestAccess(offset: 0, size: 1, direction: .write, value: byte)
            case 80..<85: return GuestAccess(offset: 0, size: 1, direction: .read)
            case 85..<88: return GuestAccess(offset: 2, size: 1, direction: .read)
            case 88..<91: return GuestAccess(offset: 3, size: 1, direction: .write, value: Bool.random(using: &rng) ? 0x83 : 0x03)
            case 91..<94: return GuestAccess(offset: 4, size: 1, direction: .write, value: Bool.random(using: &rng) ? 0x13 : 0x03)
            case 94..<97: return GuestAccess(offset: 1, size: 1, direction: .write, value: Bool.random(using: &rng) ? 0x02 : 0x01)
            default: return GuestAccess(offset: 2, size: 1, direction: .write, value: 0x07)
            }
        }
        // A second vCPU flipping DLAB, loopback and the THRE interrupt mid-stream.
        switch x {
        case 0..<25: return GuestAccess(offset: 3, size: 1, direction: .write, value: Bool.random(using: &rng) ? 0x83 : 0x03)
        case 25..<50: return GuestAccess(offset: 4, size: 1, direction: .write, value: Bool.random(using: &rng) ? 0x10 : 0x00)
        case 50..<65: return GuestAccess(offset: 1, size: 1, direction: .write, value: Bool.random(using: &rng) ? 0x02 : 0x00)
        case 65..<80: return GuestAccess(offset: 5, size: 1, direction: .read)
        case 80..<90: return GuestAccess(offset: 0, size: 1, direction: .write, value: byte)
        default: return GuestAccess(offset: 0, size: 1, direction: .read)
        }
    }
}

struct DoorbellSubject: FastPathSubject {
    final class Device: Forwarding, @unchecked Sendable {
        let memory: GuestMemory
        let doorbell: DoorbellDevice
        init() {
            // A 1 MiB guest; queue addresses outside it make completions fail.
            memory = (try? GuestMemory(size: 1 << 20)) ?? { preconditionFailure("1 MiB of test memory") }()
            doorbell = DoorbellDevice(memory: memory)
            super.init(doorbell)
        }
    }

    func make() -> Device { Device() }
    var requests: [FastPathRequest] {
        [FastPathRequest(offset: 0x40, size: 4, direction: .write, ring: 1), FastPathRequest(offset: 0x04, size: 4, direction: .read)]
    }
    func hostAction(_ rng: inout SplitMix64) -> ((Device) -> Void)? { nil }

    /// The guest polls the completion queues in RAM (no exit): a hash of their bytes.
    func memoryRead(_ d: Device) -> UInt64? {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for i in 0..<UInt64(0x10) {
            guard let w = try? d.memory.read(UInt64.self, at: GuestAddress(0x8000 + i * 8)) else { return nil }
            h = (h ^ w) &* 0x100_0000_01b3
        }
        return h
    }

    func observe(_ d: Device) -> [UInt64] {
        [UInt64(d.doorbell.completions), UInt64(d.doorbell.error)]
            + ((try? d.memory.readBytes(at: GuestAddress(0x8000), count: 0x100)) ?? []).map(UInt64.init)
    }

    func finalProbe(_ d: Device) -> [UInt64] { [0x00, 0x04, 0x08, 0x0c, 0x10, 0x14, 0x18].map { d.read(offset: $0, size: 4) } }

    func access(vcpu: Int, _ rng: inout SplitMix64) -> GuestAccess {
        let x = Int.random(in: 0..<100, using: &rng)
        if vcpu == 0 {
            switch x {
            case 0..<60: return GuestAccess(offset: 0x40, size: 4, direction: .write, value: UInt64.random(in: 0...0xffff_ffff, using: &rng))
            case 60..<80: return GuestAccess(offset: 0x04, size: 4, direction: .read)
            case 80..<85: return GuestAccess(offset: 0x18, size: 4, direction: .read)
            default: break
            }
        }
        // Reconfiguration: CONTROL, queue size and address.
        switch x % 4 {
        case 0: return GuestAccess(offset: 0x14, size: 4, direction: .write, value: UInt64(Int.random(in: 0..<4, using: &rng) == 0 ? 0 : 1))
        case 1: return GuestAccess(offset: 0x10, size: 4, direction: .write, value: [0, 3, 4, 8, 16][Int.random(in: 0..<5, using: &rng)])
        case 2: return GuestAccess(offset: 0x08, size: 4, direction: .write, value: [0x8000, 0x8040, 0xffff_fff8][Int.random(in: 0..<3, using: &rng)])
        default: return GuestAccess(offset: 0x04, size: 4, direction: .read)
        }
    }
}

struct PostCodeSubject: FastPathSubject {
    func make() -> PostCodePort { PostCodePort() }
    var requests: [FastPathRequest] { [1, 2, 4].map { FastPathRequest(offset: 0, size: $0, direction: .write) } }
    func hostAction(_ rng: inout SplitMix64) -> ((PostCodePort) -> Void)? { nil }
    func observe(_ d: PostCodePort) -> [UInt64] { [] }
    func memoryRead(_ d: PostCodePort) -> UInt64? { nil }
    func finalProbe(_ d: PostCodePort) -> [UInt64] { [1, 2, 4, 8].map { d.read(offset: 0, size: $0) } }
    func access(vcpu: Int, _ rng: inout SplitMix64) -> GuestAccess {
        let size = [1, 2, 4][Int.random(in: 0..<3, using: &rng)]
        return Int.random(in: 0..<5, using: &rng) == 0
            ? GuestAccess(offset: 0, size: size, direction: .read)
            : GuestAccess(offset: 0, size: size, direction: .write, value: UInt64.random(in: 0...255, using: &rng))
    }
}

@Suite("Fast-path properties")
struct FastPathPropertyTests {
    static let seeds: Range<UInt64> = 0..<200

    @Test("UART, one vCPU with host input: fast paths agree with the device and with program order")
    func uartOneVCPU() {
        let r = FastPathHarness.check(UARTSubject(), seeds: Self.seeds, options: FastPathHarnessOptions(vcpus: 1))
        #expect(r.failures.isEmpty, "\(r.failures.joined(separator: "\n"))")
        #expect(r.served > r.exited / 10, "the fast paths were exercised (\(r.served) served, \(r.exited) exits)")
    }

    @Test("UART, a second vCPU flipping DLAB, loopback and IER mid-stream")
    func uartTwoVCPUs() {
        let r = FastPathHarness.check(UARTSubject(), seeds: Self.seeds, options: FastPathHarnessOptions(vcpus: 2))
        #expect(r.failures.isEmpty, "\(r.failures.joined(separator: "\n"))")
        #expect(r.served > 0)
    }

    @Test("the properties catch a read served ahead of pending entries it depends on, and ignored enable words")
    func uartFaultsAreCaught() {
        // Without the drain before loopback goes on the UART does not declare LSR independent; serving it anyway is caught.
        let dependent = FastPathHarness.check(UARTSubject(), seeds: Self.seeds, options: FastPathHarnessOptions(
            vcpus: 2, assumeIndependentReads: true, connectRingDrain: false, hostActions: false))
        let drained = FastPathHarness.check(UARTSubject(), seeds: Self.seeds, options: FastPathHarnessOptions(vcpus: 2, hostActions: false))
        #expect(drained.failures.isEmpty, "with the drain the same schedules pass: \(drained.failures.joined(separator: "\n"))")
        #expect(!dependent.failures.isEmpty, "an LSR read served with the vCPU's own THR entry pending, applied after loopback went on")
        let stale = FastPathHarness.check(UARTSubject(), seeds: Self.seeds, options: FastPathHarnessOptions(vcpus: 1, ignoreEnableWords: true))
        #expect(!stale.failures.isEmpty)
    }

    @Test("doorbell: synchronous appends and STATUS from its shared slot agree with the device and program order, with a second vCPU reconfiguring it")
    func doorbell() {
        for vcpus in [1, 2] {
            let r = FastPathHarness.check(DoorbellSubject(), seeds: 0..<100, options: FastPathHarnessOptions(vcpus: vcpus))
            #expect(r.failures.isEmpty, "\(vcpus) vCPUs: \(r.failures.joined(separator: "\n"))")
            #expect(r.served > 0)
            #expect(r.slotReads > 100, "\(vcpus) vCPUs: STATUS reads served from the slot: \(r.slotReads)")
        }
        let asynchronous = FastPathHarness.check(DoorbellSubject(), seeds: 0..<100, options: FastPathHarnessOptions(vcpus: 1, ignoreSynchronous: true))
        #expect(!asynchronous.failures.isEmpty, "completions in RAM are seen without an exit: an asynchronous append is caught")
    }

    @Test("port 0x80: discarded writes agree with the device")
    func postCode() {
        let r = FastPathHarness.check(PostCodeSubject(), seeds: Self.seeds, options: FastPathHarnessOptions(vcpus: 2))
        #expect(r.failures.isEmpty, "\(r.failures.joined(separator: "\n"))")
        #expect(r.served > 0)
    }
}

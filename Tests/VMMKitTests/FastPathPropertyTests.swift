import Testing
import VMMKit

// Property tests for the fast paths devices declare (DESIGN.md, DMP step 3).
//
// Each test runs random programs on two copies of a device. The *fast* copy is
// driven as a patched guest would drive it: a stub reads the enable word the
// device maintains and, when it is set, serves the access by the fast path's
// semantics (a constant, a discarded write, a ring append applied later, in
// order, by the consumer); otherwise the access exits, and the exit first
// drains the ring, then reaches the device. The *reference* copy receives the
// same operations at their linearization points (an exit when it reaches the
// device, a ring entry when it is applied, a served read when it is served,
// or, if its own vCPU still has entries pending, right after the last of
// them). Every guest-visible value must agree: each read, the final registers
// and the bytes transmitted. With one vCPU a third copy, driven directly in
// program order without fast paths, must agree too.
//
// Every step that takes time in a real guest is its own step here, so the
// scheduler interleaves them: a stub's check of the enable word and its ring
// append; an exit's drain and its device access; a second vCPU flipping DLAB,
// loopback or IER; host input; the polling consumer applying one entry.
// Seeds are fixed; a failure prints the seed and the last steps.

/// SplitMix64: a small, fixed-seed generator.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// One guest access.
struct GuestAccess: CustomStringConvertible {
    var offset: UInt64
    var size: Int
    var direction: AccessDirection
    var value: UInt64 = 0
    var description: String { direction == .read ? "r\(offset)" : "w\(offset)=\(String(value, radix: 16))" }
}

/// A device under test, in three copies, and what the harness needs to know about it.
protocol FastPathSubject {
    associatedtype Device: BusDevice
    /// A fresh copy (fast, reference or direct).
    func make() -> Device
    /// Host-side work applied to every copy at once (UART input); `nil` for none.
    func hostAction(_ rng: inout SplitMix64) -> ((Device) -> Void)?
    /// Guest-visible state outside the registers, compared at the end (output, RAM).
    func observe(_ device: Device) -> [UInt64]
    /// Reads that probe the final registers, in order (they may have side effects; every copy gets the same).
    func finalProbe(_ device: Device) -> [UInt64]
    /// A random access of vCPU `vcpu` (vCPU 0 drives the device; vCPU 1 changes its configuration).
    func access(vcpu: Int, _ rng: inout SplitMix64) -> GuestAccess
    /// A guest-visible value the guest reads without an exit (RAM a device writes), if any.
    func memoryRead(_ device: Device) -> UInt64?
    /// The fast paths to ask for: request and ring.
    var requests: [FastPathRequest] { get }
    /// Hands the device the ring consumer's drain, if it takes one (the UART, before loopback goes on).
    func connect(_ device: Device, drain: @escaping @Sendable () -> Void)
}

extension FastPathSubject {
    func connect(_ device: Device, drain: @escaping @Sendable () -> Void) {}
}

/// The harness, weakly, for the drain a device calls back (the harness runs on one thread).
final class HarnessRef<H: AnyObject>: @unchecked Sendable {
    weak var value: H?
    init(_ value: H) { self.value = value }
}

/// How the harness serves fast paths; the faults exist to show that the properties catch them.
struct HarnessOptions {
    var vcpus = 1
    var steps = 400
    /// Serve reads as if every read fast path were independent of pending ring entries.
    var assumeIndependentReads = false
    /// Apply synchronous ring appends asynchronously.
    var ignoreSynchronous = false
    /// Ignore the enable words (serve every granted fast path always).
    var ignoreEnableWords = false
    /// Give the device the ring drain it asks for (``FastPathSubject/connect(_:drain:)``).
    var connectRingDrain = true
    /// Run the subject's host actions (UART input).
    var hostActions = true
}

final class FastPathHarness<S: FastPathSubject> {
    struct Entry { var id: Int; var vcpu: Int; var access: GuestAccess }
    enum Phase { case start, appendChecked, exitDrained }
    struct VCPU { var phase = Phase.start; var current: GuestAccess?; var index: Int }

    let subject: S
    let options: HarnessOptions
    let fast: S.Device, reference: S.Device, direct: S.Device?
    let words: FastPathEnableWordStorage
    /// A shared slot per request (offered with every read, as DMP does).
    let slots: FastPathSlotStorage
    var grants: [(request: FastPathRequest, description: FastPathDescription, word: FastPathEnableWord)] = []
    var ring: [Entry] = []
    var nextID = 0
    /// Reads served while their vCPU had entries pending: checked right after the entry they follow.
    var deferred: [(afterID: Int, access: GuestAccess, value: UInt64)] = []
    var failures: [String] = []
    var trace: [String] = []
    var rng: SplitMix64
    let seed: UInt64
    var vcpus: [VCPU]
    /// Accesses served by a fast path and accesses that exited.
    var served = 0, exited = 0
    /// Reads served from a shared slot.
    var slotReads = 0

    init(_ subject: S, seed: UInt64, options: HarnessOptions) {
        self.subject = subject
        self.options = options
        self.seed = seed
        rng = SplitMix64(state: seed)
        fast = subject.make()
        reference = subject.make()
        direct = options.vcpus == 1 ? subject.make() : nil
        words = FastPathEnableWordStorage(count: subject.requests.count)
        slots = FastPathSlotStorage(count: subject.requests.count)
        vcpus = (0..<options.vcpus).map { VCPU(index: $0) }
        if options.connectRingDrain {
            let me = HarnessRef(self)
            subject.connect(fast) { me.value?.drain() }
        }
        for (i, var r) in subject.requests.enumerated() {
            if r.direction == .read { r.slot = slots[i] }
            if let d = fast.grantFastPath(r, enableWord: words[i]) { grants.append((r, d, words[i])) }
        }
    }

    func fail(_ message: String) {
        if failures.count < 5 { failures.append("seed \(seed): \(message); last steps: \(trace.suffix(12).joined(separator: " "))") }
    }

    func grant(for a: GuestAccess) -> (description: FastPathDescription, word: FastPathEnableWord)? {
        for g in grants where g.request.offset == a.offset && g.request.size == a.size && g.request.direction == a.direction {
            return (g.description, g.word)
        }
        return nil
    }

    func enabled(_ word: FastPathEnableWord) -> Bool { options.ignoreEnableWords || word.isSet }

    /// Applies the oldest ring entry to the fast and reference copies, then checks reads that waited for it.
    func applyOne() {
        guard !ring.isEmpty else { return }
        let e = ring.removeFirst()
        trace.append("apply#\(e.id)")
        _ = fast.write(offset: e.access.offset, size: e.access.size, value: e.access.value)
        _ = reference.write(offset: e.access.offset, size: e.access.size, value: e.access.value)
        let due = deferred.filter { $0.afterID == e.id }
        deferred.removeAll { $0.afterID == e.id }
        for d in due {
            let r = reference.read(offset: d.access.offset, size: d.access.size)
            if r != d.value { fail("\(d.access) served \(hex(d.value)) ahead of pending entries; after them it reads \(hex(r))") }
        }
    }

    func drain() { while !ring.isEmpty { applyOne() } }

    func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

    /// Runs the direct copy's program-order access (one vCPU only) and returns what it reads.
    func runDirect(_ a: GuestAccess) -> UInt64? {
        guard let d = direct else { return nil }
        if a.direction == .read { return d.read(offset: a.offset, size: a.size) }
        _ = d.write(offset: a.offset, size: a.size, value: a.value)
        return nil
    }

    func step(vcpu v: Int) {
        var c = vcpus[v]
        defer { vcpus[v] = c }
        switch c.phase {
        case .start:
            let a = subject.access(vcpu: v, &rng)
            c.current = a
            if let g = grant(for: a), enabled(g.word) {
                var slotValue: UInt64?
                if case .sharedSlotRead(let slot) = g.description.kind { slotValue = slots.load(slot) }
                switch g.description.kind {
                case .constantRead, .sharedSlotRead:
                    // A constant, or the slot as the guest reads it now.
                    var value: UInt64 = slotValue ?? 0
                    if case .constantRead(let v) = g.description.kind { value = v }
                    let independent = g.description.independentOfPendingRingEntries || options.assumeIndependentReads
                    guard independent || ring.isEmpty else { break }
                    served += 1
                    if slotValue != nil { slotReads += 1 }
                    trace.append("v\(v):\(a)~\(hex(value))")
                    if let d = runDirect(a), d != value { fail("\(a) served \(hex(value)); in program order it reads \(hex(d))") }
                    if let last = ring.last(where: { $0.vcpu == v }) {
                        deferred.append((last.id, a, value))
                    } else {
                        let r = reference.read(offset: a.offset, size: a.size)
                        if r != value { fail("\(a) served \(hex(value)); the device reads \(hex(r))") }
                    }
                    return
                case .discardWrite:
                    served += 1
                    trace.append("v\(v):\(a)~drop")
                    _ = runDirect(a)
                    _ = reference.write(offset: a.offset, size: a.size, value: a.value)
                    return
                case .ringAppend(_, let mode):
                    // The stub saw the word set; it appends in a later step. In program order an asynchronous
                    // write happens now; a synchronous one when the producer has seen it applied.
                    trace.append("v\(v):\(a)?")
                    if mode == .asynchronous { _ = runDirect(a) }
                    c.phase = .appendChecked
                    return
                default:
                    break
                }
            }
            // The exit: the ring is drained first, the device access is a later step.
            trace.append("v\(v):\(a)!")
            drain()
            c.phase = .exitDrained
        case .appendChecked:
            guard let a = c.current else { return }
            served += 1
            let e = Entry(id: nextID, vcpu: v, access: a)
            nextID += 1
            ring.append(e)
            trace.append("v\(v):append#\(e.id)")
            if case .ringAppend(_, .synchronous)? = grant(for: a)?.description.kind, !options.ignoreSynchronous {
                // The producer waits until the consumer has applied its entry.
                while ring.contains(where: { $0.id == e.id }) { applyOne() }
            }
            if case .ringAppend(_, .synchronous)? = grant(for: a)?.description.kind { _ = runDirect(a) }
            c.phase = .start
        case .exitDrained:
            guard let a = c.current else { return }
            exited += 1
            trace.append("v\(v):\(a)=")
            if a.direction == .read {
                let f = fast.read(offset: a.offset, size: a.size)
                let r = reference.read(offset: a.offset, size: a.size)
                if f != r { fail("\(a) exited: the device read \(hex(f)), the reference \(hex(r))") }
                if let d = runDirect(a), d != f { fail("\(a) reads \(hex(f)); in program order \(hex(d))") }
            } else {
                _ = runDirect(a)
                _ = fast.write(offset: a.offset, size: a.size, value: a.value)
                _ = reference.write(offset: a.offset, size: a.size, value: a.value)
            }
            c.phase = .start
        }
    }

    /// Runs the program and the final comparison; returns the failures.
    func run() -> [String] {
        for _ in 0..<options.steps {
            let pick = Int.random(in: 0..<(vcpus.count + 2), using: &rng)
            if pick == vcpus.count {
                applyOne() // the polling consumer
                continue
            } else if pick > vcpus.count {
                if options.hostActions, let h = subject.hostAction(&rng) {
                    trace.append("host")
                    // Host input is asynchronous to the guest: a read served before it is ordered before it, so
                    // it is no longer compared with the state after its pending entries (which now includes the input).
                    deferred.removeAll()
                    h(fast); h(reference); if let d = direct { h(d) }
                }
                continue
            }
            step(vcpu: pick)
            // Guest reads of RAM the device writes: no exit, no fast path.
            if let m = subject.memoryRead(fast), let r = subject.memoryRead(reference), m != r {
                fail("guest memory reads \(hex(m)); the reference \(hex(r))")
            }
            if let d = direct, let m = subject.memoryRead(fast), let x = subject.memoryRead(d), m != x {
                fail("guest memory reads \(hex(m)); in program order \(hex(x))")
            }
        }
        // Finish every vCPU's access in flight, then the ring.
        for v in vcpus.indices { while vcpus[v].phase != .start { step(vcpu: v) } }
        drain()
        if !deferred.isEmpty { fail("reads still deferred at the end") }
        let pf = subject.finalProbe(fast), pr = subject.finalProbe(reference)
        if pf != pr { fail("final registers \(pf) differ from the reference's \(pr)") }
        if subject.observe(fast) != subject.observe(reference) { fail("device output differs from the reference's") }
        if let d = direct {
            if subject.finalProbe(d) != pf { fail("final registers differ from program order") }
            if subject.observe(d) != subject.observe(fast) { fail("device output differs from program order") }
        }
        return failures
    }
}

/// Runs `seeds` seeds; returns the failures and how many accesses a fast path served.
func runProperty<S: FastPathSubject>(_ subject: S, seeds: Range<UInt64>, _ options: HarnessOptions)
    -> (failures: [String], served: Int, exited: Int, slotReads: Int) {
    var failures: [String] = [], served = 0, exited = 0, slotReads = 0
    for seed in seeds {
        let h = FastPathHarness(subject, seed: 0x5EED_0000 &+ seed, options: options)
        failures += h.run()
        served += h.served; exited += h.exited; slotReads += h.slotReads
    }
    return (failures, served, exited, slotReads)
}

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
        let r = runProperty(UARTSubject(), seeds: Self.seeds, HarnessOptions(vcpus: 1))
        #expect(r.failures.isEmpty, "\(r.failures.joined(separator: "\n"))")
        #expect(r.served > r.exited / 10, "the fast paths were exercised (\(r.served) served, \(r.exited) exits)")
    }

    @Test("UART, a second vCPU flipping DLAB, loopback and IER mid-stream")
    func uartTwoVCPUs() {
        let r = runProperty(UARTSubject(), seeds: Self.seeds, HarnessOptions(vcpus: 2))
        #expect(r.failures.isEmpty, "\(r.failures.joined(separator: "\n"))")
        #expect(r.served > 0)
    }

    @Test("the properties catch a read served ahead of pending entries it depends on, and ignored enable words")
    func uartFaultsAreCaught() {
        // Without the drain before loopback goes on the UART does not declare LSR independent; serving it anyway is caught.
        let dependent = runProperty(UARTSubject(), seeds: Self.seeds,
                                    HarnessOptions(vcpus: 2, assumeIndependentReads: true, connectRingDrain: false, hostActions: false))
        let drained = runProperty(UARTSubject(), seeds: Self.seeds, HarnessOptions(vcpus: 2, hostActions: false))
        #expect(drained.failures.isEmpty, "with the drain the same schedules pass: \(drained.failures.joined(separator: "\n"))")
        #expect(!dependent.failures.isEmpty, "an LSR read served with the vCPU's own THR entry pending, applied after loopback went on")
        let stale = runProperty(UARTSubject(), seeds: Self.seeds, HarnessOptions(vcpus: 1, ignoreEnableWords: true))
        #expect(!stale.failures.isEmpty)
    }

    @Test("doorbell: synchronous appends and STATUS from its shared slot agree with the device and program order, with a second vCPU reconfiguring it")
    func doorbell() {
        for vcpus in [1, 2] {
            let r = runProperty(DoorbellSubject(), seeds: 0..<100, HarnessOptions(vcpus: vcpus))
            #expect(r.failures.isEmpty, "\(vcpus) vCPUs: \(r.failures.joined(separator: "\n"))")
            #expect(r.served > 0)
            #expect(r.slotReads > 100, "\(vcpus) vCPUs: STATUS reads served from the slot: \(r.slotReads)")
        }
        let asynchronous = runProperty(DoorbellSubject(), seeds: 0..<100, HarnessOptions(vcpus: 1, ignoreSynchronous: true))
        #expect(!asynchronous.failures.isEmpty, "completions in RAM are seen without an exit: an asynchronous append is caught")
    }

    @Test("port 0x80: discarded writes agree with the device")
    func postCode() {
        let r = runProperty(PostCodeSubject(), seeds: Self.seeds, HarnessOptions(vcpus: 2))
        #expect(r.failures.isEmpty, "\(r.failures.joined(separator: "\n"))")
        #expect(r.served > 0)
    }
}

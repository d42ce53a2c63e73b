import VMMKit

// The fast-path property harness (DESIGN.md, DMP step 3), for any device.
//
// Each check runs random programs on two copies of a device. The *fast* copy is
// driven as a patched guest would drive it: a stub reads the enable word the
// device maintains and, when it is set, serves the access by the fast path's
// semantics (a constant, a shared slot, a discarded write, a ring append
// applied later, in order, by the consumer; a synchronous append waited for);
// otherwise the access exits, and the exit first drains the ring, then
// reaches the device. The *reference* copy receives the same operations at
// their linearization points (an exit when it reaches the device, a ring entry
// when it is applied, a served read when it is served, or, if its own vCPU
// still has entries pending, right after the last of them). Every
// guest-visible value must agree: each read, the final registers and the
// device's output. With one vCPU a third copy, driven directly in program
// order without fast paths, must agree too.
//
// Every step that takes time in a real guest is its own step here, so the
// scheduler interleaves them: a stub's check of the enable word and its ring
// append; an exit's drain and its device access; a second vCPU changing the
// device's configuration; host input; the polling consumer applying one entry.
// Seeds are fixed; a failure names the seed and the last steps.

/// Checks a device's fast paths against the device itself: random programs run on a copy driven as a
/// patched guest drives it and on a reference copy (and, with one vCPU, a copy in program order); every
/// guest-visible value must agree. Single-threaded and deterministic for a seed.
public final class FastPathHarness<S: FastPathSubject> {
    private struct Entry { var id: Int; var vcpu: Int; var access: GuestAccess }
    private enum Phase { case start, appendChecked, exitDrained }
    private struct VCPU { var phase = Phase.start; var current: GuestAccess?; var index: Int }

    private let subject: S
    private let options: FastPathHarnessOptions
    private let fast: S.Device, reference: S.Device, direct: S.Device?
    private let words: FastPathEnableWordStorage
    /// A shared slot per request (offered with every read, as DMP does).
    private let slots: FastPathSlotStorage
    private var grants: [(request: FastPathRequest, description: FastPathDescription, word: FastPathEnableWord)] = []
    private var ring: [Entry] = []
    private var nextID = 0
    /// Reads served while their vCPU had entries pending: checked right after the entry they follow.
    private var deferred: [(afterID: Int, access: GuestAccess, value: UInt64)] = []
    private var failures: [String] = []
    private var trace: [String] = []
    private var rng: SplitMix64
    /// The seed of this program.
    public let seed: UInt64
    private var vcpus: [VCPU]
    /// Accesses served by a fast path.
    public private(set) var served = 0
    /// Accesses that exited.
    public private(set) var exited = 0
    /// Reads served from a shared slot.
    public private(set) var slotReads = 0

    /// A harness for one random program of `subject`'s accesses from `seed`: makes the device's copies
    /// and asks the fast copy for every fast path in ``FastPathSubject/requests`` (reads offered a slot).
    public init(_ subject: S, seed: UInt64, options: FastPathHarnessOptions = FastPathHarnessOptions()) {
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
            let box = DrainBox()
            box.action = { [weak self] in self?.drain() }
            subject.connect(fast) { box.action?() }
        }
        for (i, var r) in subject.requests.enumerated() {
            if r.direction == .read { r.slot = slots[i] }
            if let d = fast.grantFastPath(r, enableWord: words[i]) { grants.append((r, d, words[i])) }
        }
    }

    private func fail(_ message: String) {
        if failures.count < 5 { failures.append("seed \(seed): \(message); last steps: \(trace.suffix(12).joined(separator: " "))") }
    }

    private func grant(for a: GuestAccess) -> (description: FastPathDescription, word: FastPathEnableWord)? {
        for g in grants where g.request.offset == a.offset && g.request.size == a.size && g.request.direction == a.direction {
            return (g.description, g.word)
        }
        return nil
    }

    private func enabled(_ word: FastPathEnableWord) -> Bool { options.ignoreEnableWords || word.isSet }

    /// Applies the oldest ring entry to the fast and reference copies, then checks reads that waited for it.
    private func applyOne() {
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

    private func drain() { while !ring.isEmpty { applyOne() } }

    private func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

    /// Runs the direct copy's program-order access (one vCPU only) and returns what it reads.
    private func runDirect(_ a: GuestAccess) -> UInt64? {
        guard let d = direct else { return nil }
        if a.direction == .read { return d.read(offset: a.offset, size: a.size) }
        _ = d.write(offset: a.offset, size: a.size, value: a.value)
        return nil
    }

    private func step(vcpu v: Int) {
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

    /// Runs the program and the final comparison; returns the failures (at most five, each with the
    /// seed and the last steps), empty when every guest-visible value agreed.
    public func run() -> [String] {
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

extension FastPathHarness {
    /// Runs one program per seed in `seeds` and adds up what they found.
    public static func check(_ subject: S, seeds: Range<UInt64>,
                             options: FastPathHarnessOptions = FastPathHarnessOptions()) -> FastPathCheckResult {
        var r = FastPathCheckResult(failures: [], served: 0, exited: 0, slotReads: 0)
        for seed in seeds {
            let h = FastPathHarness(subject, seed: 0x5EED_0000 &+ seed, options: options)
            r.failures += h.run()
            r.served += h.served; r.exited += h.exited; r.slotReads += h.slotReads
        }
        return r
    }
}

/// The harness's drain, for the device to call back (the harness runs on one thread, so the device calls it on
/// that thread, from inside an access the harness made).
private final class DrainBox: @unchecked Sendable {
    var action: (() -> Void)?
}

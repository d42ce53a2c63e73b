// Benchmarks of the paravirtual ring (v2):
//
// - "ring drain": the consumer alone drains published entries into an
//   in-memory sink device (target: 50 M entries/s or more);
// - "ring poller vs producer": the polling consumer (a running VM on the mock
//   backend, so only the poller and the producer use CPU) against a host
//   producer thread paced at 25 M entries/s for one second (target: no
//   full-ring fallback); a push that finds the poller asleep kicks it, as
//   ring.inc does (counted as kicks);
// - "uart-cpl3-pv": the static-PV twin of uart-cpl3 on real KVM with the
//   poller, over a steady phase of about a second: cycles per byte (target
//   ≤ 120) and exits per ring entry (target ≤ 1/10,000), and the poller's CPU time.
//
// Run: cd Benchmarks && swift package benchmark --target Ring
// Each figure is a custom metric; see the printed table.
import Benchmark
import VMMKit
import VMMKitTesting
#if canImport(Glibc)
import Glibc
#endif

/// A device that counts what it is given.
final class CountingSink: BusDevice, @unchecked Sendable {
    let name = "counting-sink"
    var count = 0
    var sum: UInt64 = 0
    func read(offset: UInt64, size: Int) -> UInt64 { 0 }
    func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect { count += 1; sum &+= value; return .none }
    func writeBatch(offset: UInt64, size: Int, values: UnsafeBufferPointer<UInt64>) -> BatchWriteResult {
        for v in values { sum &+= v }
        count += values.count
        return BatchWriteResult(applied: values.count, effect: .none)
    }
}

func nanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

func stride(for slots: UInt32) -> UInt64 { (PVRingLayout.slotsOffset + UInt64(slots) * 8 + 4095) / 4096 * 4096 }

/// The consumer alone: entries are published with plain stores (one producer,
/// no contention; not timed), then drained; only the drains are timed.
/// Returns entries per second.
func drainRate(slots: UInt32, total: Int) throws -> Double {
    let memory = try GuestMemory(size: 32 << 20)
    let bus = IOBus()
    let sink = CountingSink()
    try bus.attach(sink, ports: 0x3f8..<0x3f9)
    let ring = try PVRingDevice(memory: memory, bus: bus, stride: stride(for: slots),
                                targets: [PVRingTarget(space: .pio, address: 0x3f8)], slotCount: slots)
    let h = ring.header(0).rawValue
    let hint = try memory.sharedWord(at: GuestAddress(h))
    let words = try (0..<UInt64(slots)).map { try memory.sharedWord(at: GuestAddress(h + PVRingLayout.slotsOffset + $0 * 8)) }
    let mask = UInt64(slots - 1)
    var p: UInt64 = 0
    var timed: UInt64 = 0
    while p < UInt64(total) {
        for i in 0..<UInt64(slots) {
            let q = p + i
            words[Int(q & mask)].store(PVRingLayout.slotWord(sequence: UInt32(truncatingIfNeeded: q + 1), value: UInt32(q & 0xff)))
        }
        hint.store(p + UInt64(slots))
        let t0 = nanoseconds()
        ring.drain()
        timed += nanoseconds() - t0
        p += UInt64(slots)
    }
    precondition(sink.count == Int(p), "drained \(sink.count) of \(p)")
    return Double(p) / (Double(timed) / 1e9)
}

/// The guest producer of `ring.inc` (asynchronous ring) as a tight loop over
/// local state: the benchmark's producer thread. ``RingProducerModel`` is the
/// same algorithm one step at a time, for tests.
struct FastProducer {
    let hint: SharedGuestWord
    let flags: SharedGuestWord
    let slots: [SharedGuestWord]
    let count: UInt64
    var fullFallbacks = 0

    init(memory: GuestMemory, header: GuestAddress, count: UInt32) throws {
        hint = try memory.sharedWord(at: header)
        flags = try memory.sharedWord(at: GuestAddress(header.rawValue + PVRingLayout.widthOffset))
        slots = try (0..<UInt64(count)).map { try memory.sharedWord(at: GuestAddress(header.rawValue + PVRingLayout.slotsOffset + $0 * 8)) }
        self.count = UInt64(count)
    }

    /// What a push came to.
    enum Outcome { case published, kick, fallback }

    /// Publishes `value`: `.kick` when the consumer sleeps (the wake flag: the
    /// guest then writes the kick register), `.fallback` when the caller would
    /// do the original access.
    @inline(__always)
    mutating func push(_ value: UInt32) -> Outcome {
        var tries = 4096
        let c32 = UInt32(truncatingIfNeeded: count)
        while tries > 0 {
            tries -= 1
            let p = hint.load()
            let slot = slots[Int(p & (count - 1))]
            let w = slot.load()
            let seq = PVRingLayout.sequence(of: w), p32 = UInt32(truncatingIfNeeded: p)
            if seq == p32 {
                guard slot.compareExchange(expected: w, desired: PVRingLayout.slotWord(sequence: p32 &+ 1, value: value)).exchanged else { continue }
                _ = hint.compareExchange(expected: p, desired: p &+ 1)
                return UInt32(truncatingIfNeeded: flags.load() >> 32) & PVRingLayout.wakeFlag != 0 ? .kick : .published
            }
            if seq == p32 &+ 1 || seq == p32 &+ c32 { _ = hint.compareExchange(expected: p, desired: p &+ 1); continue }
            if seq == p32 &+ 1 &- c32 {
                if UInt32(truncatingIfNeeded: flags.load() >> 32) & PVRingLayout.pollingFlag == 0 { break }
                continue // full, a consumer polls: wait a little
            }
        }
        fullFallbacks += 1
        return .fallback
    }
}

struct PacedRun {
    var produced = 0
    var fallbacks = 0
    var fullFallbacks = 0
    var kicks = 0
    /// The longest time the consumer index stood still with entries in the ring (ns).
    var longestStall: UInt64 = 0
    var seconds = 0.0
    var pollerCPU: UInt64 = 0
    var consumed = 0
    var sleeps = 0
    var descheduled = 0
}

/// The polling consumer against one producer thread (this one) paced at `rate` entries per second.
func pacedProducer(rate: Double, seconds: Double, slots: UInt32) throws -> PacedRun {
    let mock = MockHypervisor()
    let vm = try VirtualMachine(backend: mock, configuration: VMConfiguration(memorySize: 32 << 20))
    let sink = CountingSink()
    try vm.bus.attach(sink, ports: 0x3f8..<0x3f9)
    // Above the low 16 MiB, so rings larger than the paravirtual area fit (RING_SLOTS).
    let area = GuestRange(start: GuestAddress(16 << 20), size: 16 << 20)
    let ring = try PVRingDevice(memory: vm.memory, bus: vm.bus, base: area.start, area: area, stride: stride(for: slots),
                                targets: [PVRingTarget(space: .pio, address: 0x3f8)], slotCount: slots,
                                polling: .enabled(idleNanoseconds: pollIdle, spinsBetweenChecks: pollSpins))
    ring.attach(to: vm)
    mock.vcpu(0)?.script([.spin])
    try vm.start()
    while !ring.isPolling { usleep(100) }
    var producer = try FastProducer(memory: vm.memory, header: ring.header(0), count: slots)
    var run = PacedRun()
    let start = nanoseconds()
    let end = start + UInt64(seconds * 1e9)
    var now = start
    var skipped = 0
    var lastConsumer: UInt64 = 0
    var lastAdvanceAt = start
    while now < end {
        var due = Int(Double(now - start) * rate / 1e9) - skipped
        if due - run.produced > 4096 {
            // This thread was off its CPU: a producer at 25 M/s does not burst to catch up.
            skipped += due - run.produced - 1
            due = run.produced + 1
            run.descheduled += 1
        }
        // How long the consumer index stood still while entries waited (sampled).
        let ci = ring.consumerIndex(ring: 0)
        if ci != lastConsumer || ci == UInt64(run.produced) {
            lastConsumer = ci
            lastAdvanceAt = now
        } else if now - lastAdvanceAt > run.longestStall {
            run.longestStall = now - lastAdvanceAt
        }
        while run.produced < due {
            switch producer.push(UInt32(truncatingIfNeeded: run.produced)) {
            case .published: break
            case .kick:
                // The guest writes the kick register: an exit, before which the VMM
                // drains; the kick wakes the sleeping poller.
                run.kicks += 1
                ring.drain()
                ring.wakePoller()
            case .fallback:
                // The guest's original access would exit now: the VMM drains before
                // handling it, and the exit to the ring's register wakes a sleeping poller.
                run.fallbacks += 1
                ring.drain(wakePoller: true)
                ring.wakePoller()
            }
            run.produced += 1
        }
        now = nanoseconds()
    }
    run.seconds = Double(now - start) / 1e9
    vm.stop()
    _ = try vm.wait()
    run.fullFallbacks = producer.fullFallbacks
    run.pollerCPU = ring.pollerCPUNanoseconds
    run.consumed = ring.consumed[0]
    run.sleeps = ring.pollerSleeps
    return run
}

let guests: String = {
    var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
    parts.removeLast(4) // Benchmarks/Benchmarks/Ring/Ring.swift
    return parts.joined(separator: "/") + "/Guests"
}()

/// Keeps the tail of the console (the RESULT line), drops the rest.
final class TailCapture: @unchecked Sendable {
    private var tail: [UInt8] = []
    func sink() -> OutputSink {
        OutputSink { [self] chunk in
            tail.append(contentsOf: chunk)
            if tail.count > 8192 { tail.removeFirst(tail.count - 4096) }
        }
    }
    var text: String { String(decoding: tail, as: UTF8.self) }
}

struct TwinRun {
    var cyclesPerByte = 0.0
    var steadyExits = 0
    var steadyEntries = 0
    var steadyNanoseconds: UInt64 = 0
    var pollerCPU: UInt64 = 0
    var checksum = ""
}

/// The static-PV twin of uart-cpl3 on real KVM, with or without the poller.
func uartTwin(iters: Int, polling: Bool) throws -> TwinRun {
    let lineLength = 38
    let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
    let out = TailCapture()
    let devices = try StandardDevices.install(on: vm, console: out.sink(), ringPolling: polling ? .enabled(idleNanoseconds: pollIdle, spinsBetweenChecks: pollSpins) : .disabled)
    let warmup = iters / 10
    _ = try X86Boot.load(.elf(try ImageFile.read(guests + "/uart-cpl3-pv.elf")), commandLine: "iters=\(iters) warmup=\(warmup)", into: vm)
    guard case .guestExit(0) = try vm.run() else { throw BenchError.guestFailed }
    guard let line = out.text.split(separator: "\n").last(where: { $0.hasPrefix("RESULT ") }) else { throw BenchError.noResult }
    var run = TwinRun()
    for w in line.split(separator: " ") {
        if w.hasPrefix("cycles_per_iter="), let c = Double(w.dropFirst(16)) { run.cyclesPerByte = c / Double(lineLength) }
        if w.hasPrefix("checksum=") { run.checksum = String(w.dropFirst(9)) }
    }
    run.steadyExits = devices.marker.steadyPhase?.exits ?? -1
    run.steadyNanoseconds = devices.marker.steadyPhase?.nanoseconds ?? 0
    run.steadyEntries = (iters - warmup) * lineLength
    run.pollerCPU = devices.rings.pollerCPUNanoseconds
    return run
}

enum BenchError: Error { case guestFailed, noResult }

/// `RING_SLOTS` overrides the ring size of the paced-producer benchmark
/// (at most 2^20). The default, 2^20 slots (8 MiB), holds 42 ms at 25 M/s:
/// this machine takes a spinning thread off its CPU for 1-18 ms several times
/// a second (nothing of VMMKit involved), and a ring must hold the longest
/// such stall of the poller; 65,536 slots (2.6 ms) filled 0-1 times per run.
let pacedSlots: UInt32 = getenv("RING_SLOTS").flatMap { UInt32(String(cString: $0)) }.map { min($0, 1 << 20) } ?? 1 << 20
/// `RING_POLL_SPINS` overrides the poller's spins between checks (default 16).
let pollSpins: Int = getenv("RING_POLL_SPINS").flatMap { Int(String(cString: $0)) } ?? 16
/// `RING_POLL_IDLE_MS` overrides the poller's idle period (default 2 ms).
let pollIdle: UInt64 = getenv("RING_POLL_IDLE_MS").flatMap { UInt64(String(cString: $0)) }.map { $0 * 1_000_000 } ?? 2_000_000

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(metrics: [.wallClock], maxDuration: .seconds(30), maxIterations: 5)

    Benchmark("ring drain: consumer alone into an in-memory sink",
              configuration: .init(metrics: [.custom("M entries/s", polarity: .prefersLarger, useScalingFactor: false)],
                                   maxIterations: 5)) { benchmark in
        for _ in benchmark.scaledIterations {
            let rate = try drainRate(slots: 4096, total: 16 << 20)
            benchmark.measurement(.custom("M entries/s", polarity: .prefersLarger, useScalingFactor: false), Int(rate / 1e6))
            print("ring drain: \(Int(rate / 1e6)) M entries/s")
        }
    }

    Benchmark("ring poller vs producer thread at 25 M entries/s, 1 s, \(pacedSlots) slots",
              configuration: .init(metrics: [.custom("full-ring fallbacks", useScalingFactor: false),
                                             .custom("M entries/s produced", polarity: .prefersLarger, useScalingFactor: false),
                                             .custom("kicks (poller asleep)", useScalingFactor: false),
                                             .custom("poller CPU ms", useScalingFactor: false)],
                                   maxIterations: 5)) { benchmark in
        for _ in benchmark.scaledIterations {
            let r = try pacedProducer(rate: 25e6, seconds: 1, slots: pacedSlots)
            benchmark.measurement(.custom("full-ring fallbacks", useScalingFactor: false), r.fullFallbacks)
            benchmark.measurement(.custom("kicks (poller asleep)", useScalingFactor: false), r.kicks)
            benchmark.measurement(.custom("M entries/s produced", polarity: .prefersLarger, useScalingFactor: false), Int((Double(r.produced) / r.seconds / 1e6).rounded()))
            benchmark.measurement(.custom("poller CPU ms", useScalingFactor: false), Int(r.pollerCPU / 1_000_000))
            print("poller vs producer: produced \(r.produced) in \(r.seconds) s (\(Double(r.produced) / r.seconds / 1e6) M/s), consumed \(r.consumed), fallbacks \(r.fallbacks), full-ring fallbacks \(r.fullFallbacks), kicks \(r.kicks), longest consumer stall \(r.longestStall / 1000) µs, poller CPU \(r.pollerCPU / 1_000_000) ms, poller sleeps \(r.sleeps), producer descheduled \(r.descheduled)x")
        }
    }

    if KVMSystem.unavailableReason() == nil {
        Benchmark("uart-cpl3-pv with the polling consumer (real KVM)",
                  configuration: .init(metrics: [.custom("cycles per byte", useScalingFactor: false),
                                                 .custom("ring entries per exit", polarity: .prefersLarger, useScalingFactor: false),
                                                 .custom("poller CPU ms", useScalingFactor: false)],
                                       maxIterations: 5)) { benchmark in
            for _ in benchmark.scaledIterations {
                let r = try uartTwin(iters: 200_000, polling: true)
                benchmark.measurement(.custom("cycles per byte", useScalingFactor: false), Int(r.cyclesPerByte.rounded()))
                benchmark.measurement(.custom("ring entries per exit", polarity: .prefersLarger, useScalingFactor: false), r.steadyEntries / max(1, r.steadyExits))
                benchmark.measurement(.custom("poller CPU ms", useScalingFactor: false), Int(r.pollerCPU / 1_000_000))
                print("uart-cpl3-pv: \(r.cyclesPerByte) cycles/byte, \(r.steadyExits) exits for \(r.steadyEntries) entries in \(r.steadyNanoseconds / 1_000_000) ms, poller CPU \(r.pollerCPU / 1_000_000) ms, checksum \(r.checksum)")
            }
        }
    }
}


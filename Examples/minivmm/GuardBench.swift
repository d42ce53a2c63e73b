import ArgumentParser
import Synchronization
import VMMKit
#if canImport(Glibc)
import Glibc
#endif

/// `minivmm bench-guards`: what guarding one page costs on a running guest.
///
/// A CPL3 guest (native on every KVM host) writes one byte into every page
/// of a working set, pass after pass, and writes port 0x80 after each pass
/// (the host timestamps it). While it runs, the host guards one page
/// (``MemorySlots/protect(_:)``, from the main thread: pause, slot split,
/// resume), lets a few passes go, and unguards it. Reported per layout
/// (RAM carved into small slots, or one big slot) and per page guarded (a
/// code page, which the loader gives slots of its own, or a data page in
/// the working set's slot when RAM is one slot, or the first page the guest
/// writes each pass, so each pass makes one guarded store): the latency of one protect
/// and one unprotect, and the guest's pass time before, for the pass the
/// protect fell in, and the pass after. Runs alternate the variants.
struct GuardBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-guards",
        abstract: "Measure page guards: protect/unprotect latency on a running guest and its slowdown, RAM carved vs one big slot.")

    @Option(help: "Runs per variant (interleaved).")
    var runs: Int = 5

    @Option(help: "Guest memory in MiB.")
    var memory: UInt64 = 256

    @Option(help: "Working set the guest writes each pass, in MiB (from 16 MiB up).")
    var workingSet: UInt64 = 192

    func validate() throws {
        guard runs >= 1, runs <= 100 else { throw ValidationError("--runs must be 1...100") }
        guard memory >= 64, memory <= 3072 else { throw ValidationError("--memory must be 64...3072 (MiB)") }
        // Not `workingSet + 16`: that traps for a --working-set near 2^64 (memory is at least 64 here).
        guard workingSet >= 1, workingSet <= memory - 16 else { throw ValidationError("--working-set must fit above 16 MiB") }
    }

    struct Variant {
        var name: String
        var granularity: UInt64
        var target: GuestAddress
    }

    struct Sample {
        var pause = 0.0, protect = 0.0, unprotect = 0.0, before = 0.0, withProtect = 0.0, after = 0.0, withUnprotect = 0.0
    }

    func run() throws {
        let variants = [
            Variant(name: "carved 2M, code page", granularity: 2 << 20, target: GuestAddress(0x10_0000)),
            Variant(name: "carved 2M, data page", granularity: 2 << 20, target: GuestAddress(0x20_0000)),
            Variant(name: "carved 2M, written page", granularity: 2 << 20, target: GuestAddress(0x100_0000)),
            Variant(name: "one slot, code page", granularity: 0, target: GuestAddress(0x10_0000)),
            Variant(name: "one slot, data page", granularity: 0, target: GuestAddress(0x20_0000)),
        ]
        var samples = Array(repeating: [Sample](), count: variants.count)
        var notes: [String] = []
        for _ in 0..<runs {
            for (i, v) in variants.enumerated() {
                let (s, note) = try measure(v)
                samples[i].append(s)
                if let note, !notes.contains(note) { notes.append(note) }
            }
        }
        print("page guards: one page guarded and unguarded on a running CPL3 guest writing \(workingSet) MiB per pass (\(memory) MiB RAM), \(runs) runs per variant")
        print("values: median [min–max]; pause+resume alone, protect and unprotect in µs (called from another thread: pause, slots, resume); passes in ms")
        let cols = ["pause+resume", "protect", "unprotect", "pass before", "pass w/ protect", "pass after", "pass w/ unprotect"]
        print(pad("variant", 25) + cols.map { pad($0, 20) }.joined())
        for (i, v) in variants.enumerated() {
            let s = samples[i]
            let fields: [[Double]] = [s.map(\.pause), s.map(\.protect), s.map(\.unprotect), s.map(\.before), s.map(\.withProtect), s.map(\.after), s.map(\.withUnprotect)]
            print(pad(v.name, 25) + fields.map { pad(stat($0), 20) }.joined())
        }
        for n in notes { print("note: \(n)") }
    }

    /// One run of one variant.
    func measure(_ v: Variant) throws -> (Sample, String?) {
        var config = VMConfiguration(memorySize: memory << 20)
        config.slotGranularity = v.granularity
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: config)
        let clock = PassClock()
        vm.addExitHandler(ClosureExitHandler { exit, _ in
            guard case .io(let io) = exit, io.port == 0x80 else { return .pass }
            clock.tick()
            return .handled
        })
        let pages = UInt32(workingSet << 8)
        let code: [UInt8] = [
            0x48, 0xc7, 0xc7, 0x00, 0x00, 0x00, 0x01,           // pass: mov rdi, 0x1000000
            0x48, 0xc7, 0xc1] + withUnsafeBytes(of: pages.littleEndian, Array.init) + [  // mov rcx, pages
            0x88, 0x07,                                         // touch: mov [rdi], al
            0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00,           // add rdi, 0x1000
            0x48, 0xff, 0xc9,                                   // dec rcx
            0x75, 0xf2,                                         // jnz touch
            0xe6, 0x80,                                         // out 0x80, al
            0xeb, 0xe0,                                         // jmp pass
        ]
        _ = try X86Boot.load(.flat(code), into: vm)
        try X86Boot.enterUserMode(vm)
        let note = vm.slots.zapAllQuirkDisabled ? "KVM_X86_QUIRK_SLOT_ZAP_ALL disabled on carved layouts" : nil
        let page = GuestRange(start: v.target, size: 4096)
        try vm.start()
        defer { vm.stop(); _ = try? vm.wait() }
        try clock.wait(until: 4)
        // The pause alone (no slot change), for comparison.
        let p0 = monotonicNanoseconds()
        guard vm.pauseAll() else { throw ValidationError("the VM stopped") }
        vm.resumeAll()
        let p1 = monotonicNanoseconds()
        try clock.wait(until: clock.count + 3)
        let t0 = monotonicNanoseconds()
        try vm.slots.protect(page)
        let t1 = monotonicNanoseconds()
        try clock.wait(until: clock.count + 4)
        let t2 = monotonicNanoseconds()
        try vm.slots.unprotect(page)
        let t3 = monotonicNanoseconds()
        try clock.wait(until: clock.count + 4)
        let ticks = clock.snapshot()
        // Pass k runs from ticks[k-1] to ticks[k].
        func pass(containing t: UInt64) -> Double {
            guard let k = ticks.firstIndex(where: { $0 > t }), k > 0 else { return 0 }
            return Double(ticks[k] - ticks[k - 1]) / 1e6
        }
        func pass(after t: UInt64) -> Double {
            guard let k = ticks.firstIndex(where: { $0 > t }), k + 1 < ticks.count else { return 0 }
            return Double(ticks[k + 1] - ticks[k]) / 1e6
        }
        var warm: [Double] = []
        for k in 2..<ticks.count where ticks[k] < t0 && ticks[k - 1] > p1 { warm.append(Double(ticks[k] - ticks[k - 1]) / 1e6) }
        let s = Sample(pause: Double(p1 - p0) / 1e3, protect: Double(t1 - t0) / 1e3, unprotect: Double(t3 - t2) / 1e3, before: middle(warm),
                       withProtect: pass(containing: t1), after: pass(after: t1), withUnprotect: pass(containing: t3))
        return (s, note)
    }

    private func middle(_ v: [Double]) -> Double {
        let s = v.sorted()
        return s.isEmpty ? 0 : s[s.count / 2]
    }

    private func stat(_ v: [Double]) -> String {
        let s = v.sorted()
        guard let lo = s.first, let hi = s.last else { return "-" }
        return "\(short(middle(s))) [\(short(lo))–\(short(hi))]"
    }

    private func short(_ v: Double) -> String {
        guard v.isFinite, v.magnitude < 9e18 else { return String(v) }
        if v >= 100 { return String(Int(v.rounded())) }
        return String((v * 10).rounded() / 10)
    }

    private func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
}

/// Timestamps of the guest's end-of-pass exits (written by the vCPU thread, read by the main thread).
final class PassClock: @unchecked Sendable {
    private let lock = Mutex<[UInt64]>([])

    /// Records the end of a pass.
    func tick() {
        let t = monotonicNanoseconds()
        lock.withLock { $0.append(t) }
    }

    /// How many passes ended.
    var count: Int { lock.withLock { $0.count } }

    /// The timestamps so far.
    func snapshot() -> [UInt64] { lock.withLock { $0 } }

    /// Waits (up to 20 s) until `n` passes ended.
    func wait(until n: Int) throws {
        for _ in 0..<20_000 {
            if count >= n { return }
            usleep(1_000)
        }
        throw ValidationError("the guest did not finish \(n) passes in 20 s")
    }
}

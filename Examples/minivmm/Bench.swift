import ArgumentParser
import VMMKit

/// `minivmm bench`: the foundation's speed figures, each measured side by side in one run.
///
/// - exit path: TSC cycles from `KVM_RUN` returning to the next `KVM_RUN`
///   (decode, statistics, exit chain, UART), in-process, for uart-cpl0's exits;
/// - start-up: wall time of whole `minivmm run` processes on the demo guest,
///   and of QEMU on the same image when `qemu-system-x86_64` is installed;
/// - workloads: the guests' own cycles per iteration under every variant
///   (``BenchVariant/all``: minivmm, its static-PV twin, KVM coalesced zones,
///   QEMU), each calibrated to a steady phase of `--seconds`, `--runs`
///   interleaved runs; `--json` prints these records as one JSON array;
/// - exit floor: uart-cpl3 under minivmm against a bare `KVM_RUN` loop on the
///   same VM setup (``ExitFloor``), interleaved pairs.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Measure the exit path, start-up time, workloads (minivmm, static-PV twin, coalesced zones, QEMU) and the exit floor.")

    /// The sections of the table view.
    enum Section: String, CaseIterable, ExpressibleByArgument {
        case exitPath = "exit-path", startup, workloads, floor
    }

    @Option(help: "Guest directory holding the workload images.")
    var guests: String = "Guests"

    @Flag(help: "Print the workload records as one JSON array on stdout (progress and notes go to stderr).")
    var json = false

    @Option(parsing: .upToNextOption, help: "Sections of the table view: \(Section.allCases.map(\.rawValue).joined(separator: ", ")).")
    var sections: [Section] = Section.allCases

    @Option(help: "Interleaved runs per workload and variant.")
    var runs: Int = 5

    @Option(help: "Shortest steady phase per run, in seconds (iteration counts are calibrated from a probe run).")
    var seconds: Double = 1

    @Option(help: "Fixed workload iterations instead of calibrating (times the granularity: doorbell-cpl3 uses 16x).")
    var iters: Int?

    @Option(parsing: .upToNextOption, help: "Workloads to run (default: all).")
    var workloads: [String] = BenchWorkload.all.map(\.name)

    @Option(parsing: .upToNextOption, help: "Variants to run (default: all; qemu only when installed).")
    var variants: [String] = BenchVariant.all.map(\.name)

    @Option(help: "Whole-process start-up runs per VMM.")
    var startupRuns: Int = 20

    @Option(help: "QEMU start-up runs (each takes seconds).")
    var qemuRuns: Int = 3

    @Option(help: "Interleaved exit-floor/minivmm pairs.")
    var floorPairs: Int = 10

    @Option(help: "uart-cpl3 iterations of each exit-floor run.")
    var floorIters: Int = 200

    @Option(help: "The C exit floor (built from Benchmarks/ExitFloorC/exitfloor.c) to run beside each pair.")
    var cFloor: String?

    @Flag(help: "Skip QEMU even when it is installed.")
    var noQemu = false

    @Option(help: "Run the VMs' threads (vCPU, ring poller, timer) under SCHED_FIFO at this priority (1-99; 0: the host's default policy), so other busy host threads cannot take their CPUs. Taken only with a host CPU per busy thread (the vCPU and the poller).")
    var realtimePriority: Int32 = 0

    @Option(help: "Slots per paravirtual ring in the in-process variants (a power of two, 2-32768; above 512 the doorbell's ring moves and its static-PV twin is left out).")
    var ringSlots: UInt32 = 512

    func validate() throws {
        try validateRingSlots(ringSlots)
        guard (0...99).contains(realtimePriority) else { throw ValidationError("--realtime-priority must be 0...99") }
        guard runs >= 1, runs <= 1000 else { throw ValidationError("--runs must be 1...1000") }
        guard seconds > 0, seconds <= 3600 else { throw ValidationError("--seconds must be in (0, 3600]") }
        if let iters, iters < 1 || iters > 100_000_000 { throw ValidationError("--iters must be 1...100000000") }
        guard floorPairs >= 1, floorIters >= 10, floorIters <= 100_000_000 else {
            throw ValidationError("--floor-pairs must be ≥ 1 and --floor-iters 10...100000000")
        }
        for w in workloads where !BenchWorkload.all.contains(where: { $0.name == w }) {
            throw ValidationError("unknown workload '\(w)': \(BenchWorkload.all.map(\.name).joined(separator: ", "))")
        }
        for v in variants where !BenchVariant.all.contains(where: { $0.name == v }) {
            throw ValidationError("unknown variant '\(v)': \(BenchVariant.all.map(\.name).joined(separator: ", "))")
        }
    }

    func run() throws {
        let qemu = noQemu ? nil : findExecutable("qemu-system-x86_64")
        let realtime = realtimePriority > 0 ? becomeRealtime(priority: realtimePriority, busyThreads: 2) : nil
        if let realtime { printError(realtime.message("bench")) }
        let env = BenchEnvironment(guests: guests, qemu: qemu, tscPerNanosecond: calibrateTSC(), ringSlots: ringSlots)
        if json {
            print(Bench.json(try workloadRecords(env), realtime: realtime))
            return
        }
        if sections.contains(.exitPath) { try exitPath() }
        if sections.contains(.startup) { try startup(qemu: qemu) }
        if sections.contains(.workloads) { printWorkloads(try workloadRecords(env)) }
        if sections.contains(.floor) { try floor(env) }
    }

    // MARK: exit path

    func exitPath() throws {
        let tscPerNs = calibrateTSC()
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
        let devices = try StandardDevices.install(on: vm, console: OutputSink { _ in })
        _ = devices
        _ = try X86Boot.load(.elf(try readFile(guests + "/uart-cpl0.elf")), commandLine: "iters=\(iters ?? 200)", into: vm)
        guard let kvcpu = vm.vcpus[0].backend as? KVMVCPU else { throw ValidationError("not a KVM vCPU") }
        let probe = ExitPathProbe(capacity: 1 << 20)
        kvcpu.exitPathProbe = probe
        _ = try vm.run()
        let ns = probe.samples.map { Double($0) / tscPerNs }.sorted()
        guard !ns.isEmpty else { return }
        func pct(_ p: Double) -> Double { ns[min(ns.count - 1, Int(Double(ns.count) * p))] }
        print("exit path (KVM_RUN return -> next KVM_RUN, uart-cpl0, \(ns.count) exits, in-process):")
        print("  median \(fmt(pct(0.5))) ns   p90 \(fmt(pct(0.9))) ns   p99 \(fmt(pct(0.99))) ns   (TSC \(fmt(tscPerNs)) GHz)")
    }

    // MARK: start-up

    func startup(qemu: String?) throws {
        let me = selfExecutable()
        var ours: [Double] = []
        for _ in 0..<max(1, startupRuns) {
            let r = try spawn([me, "run"])
            guard r.status == 0, r.output.contains("Hello from the VMMKit") else {
                throw ValidationError("minivmm run failed: status \(r.status): \(r.output)")
            }
            ours.append(r.milliseconds)
        }
        print("start-up, whole process, hello guest (\(ours.count) runs): minivmm median \(fmt(median(ours))) ms")
        guard let qemu else { print("  (qemu-system-x86_64 not installed: no QEMU figure)"); return }
        var theirs: [Double] = []
        for _ in 0..<max(1, qemuRuns) {
            let r = try spawn([qemu] + qemuArguments(guests + "/hello.elf", append: ""))
            guard r.status == 1 else { throw ValidationError("QEMU hello failed: status \(r.status)") }
            theirs.append(r.milliseconds)
        }
        print("  QEMU median \(fmt(median(theirs))) ms (\(theirs.count) runs); ratio QEMU/minivmm \(fmt(median(theirs) / median(ours)))x")
    }

    // MARK: workloads

    /// The plan from the options.
    var plan: WorkloadBenchPlan {
        WorkloadBenchPlan(workloads: BenchWorkload.all.filter { workloads.contains($0.name) },
                          variants: BenchVariant.all.filter { variants.contains($0.name) },
                          runs: runs, seconds: seconds, fixedIterations: iters,
                          progress: { printError("bench: " + $0) })
    }

    /// The `--json` output: one array, one object per workload and variant; each says in `realtime` what
    /// `--realtime-priority` came to (null when not asked for).
    static func json(_ records: [BenchRecord], realtime: RealtimeOutcome? = nil) -> String {
        JSONValue.array(records.map { r in
            var r = r
            r.extra.append((key: "realtime", value: realtime?.json ?? .null))
            return r.json
        }).rendered(indent: 2)
    }

    func workloadRecords(_ env: BenchEnvironment) throws -> [BenchRecord] {
        try runWorkloadBenchmark(plan, env)
    }

    func printWorkloads(_ records: [BenchRecord]) {
        print("workloads (guest-reported TSC cycles per iteration in the steady phase, median of \(runs) interleaved runs [range];")
        print("  host CPU: all of minivmm's threads over the steady phase; QEMU's estimated from whole-process CPU times):")
        print("  " + pad("workload", 17) + pad("variant", 11) + pad("iterations", 11, right: true) + pad("cycles/iter", 12, right: true)
              + "  " + pad("range", 22) + pad("exits", 9, right: true) + pad("host CPU ns/iter", 17, right: true))
        for r in records {
            let range = "[" + fmt(r.cyclesPerIterationRuns.min() ?? 0) + " - " + fmt(r.cyclesPerIterationRuns.max() ?? 0) + "]"
            print("  " + pad(r.workload, 17) + pad(r.variant, 11) + pad(String(r.iterations), 11, right: true)
                  + pad(fmt(r.cyclesPerIteration), 12, right: true) + "  " + pad(range, 22)
                  + pad(r.steadyExits.map(String.init) ?? "-", 9, right: true)
                  + pad(r.hostCPUNanosecondsPerIteration.map(fmt) ?? "-", 17, right: true))
        }
        for w in BenchWorkload.all {
            let mine = records.filter { $0.workload == w.name }
            guard let full = mine.first(where: { $0.variant == "full" }) else { continue }
            let ratios = mine.filter { $0.variant != "full" }.map { r in
                r.variant == "qemu" ? "qemu/full \(fmt(r.cyclesPerIteration / full.cyclesPerIteration))x"
                    : "full/\(r.variant) \(fmt(full.cyclesPerIteration / r.cyclesPerIteration))x"
            }
            if !ratios.isEmpty { print("  " + pad(w.name, 17) + ratios.joined(separator: "   ")) }
        }
    }

    // MARK: exit floor

    func floor(_ env: BenchEnvironment) throws {
        guard let w = BenchWorkload.all.first(where: { $0.name == "uart-cpl3" }) else { return }
        let pairs = try ExitFloor.pairs(w, iterations: floorIters, pairs: floorPairs, cProgram: cFloor, env) {
            printError("bench: " + $0)
        }
        guard let first = pairs.first else { return }
        let exitsPerIteration = Double(first.full.steadyExits ?? 0) / Double(max(1, first.full.steadyIterations))
        func perExit(_ cycles: Double) -> String {
            exitsPerIteration > 0 ? fmt(cycles / exitsPerIteration / env.tscPerNanosecond / 1000) + " µs/exit" : "-"
        }
        func line(_ label: String, _ c: [Double]) {
            guard !c.isEmpty else { return }
            print("  " + pad(label, 30) + pad(fmt(median(c)), 9, right: true)
                  + " [\(fmt(c.min() ?? 0)) - \(fmt(c.max() ?? 0))]  \(perExit(median(c)))")
        }
        func gapLine(_ label: String, _ g: [Double]) {
            guard !g.isEmpty else { return }
            print("  \(label): median \(fmt(median(g)))% [\(fmt(g.min() ?? 0))% - \(fmt(g.max() ?? 0))%] per pair")
        }
        print("exit floor (uart-cpl3 iters=\(floorIters), \(pairs.count) interleaved pairs, cycles per iteration, median [range]):")
        line("floor (bare KVM_RUN loop)", pairs.map(\.floor.cyclesPerIteration))
        line("C floor (no VMMKit)", pairs.compactMap(\.cFloor?.cyclesPerIteration))
        line("minivmm full", pairs.map(\.full.cyclesPerIteration))
        gapLine("minivmm over the floor", pairs.map { $0.gap * 100 })
        gapLine("minivmm over the C floor", pairs.compactMap { p in p.cFloor.map { (p.full.cyclesPerIteration / $0.cyclesPerIteration - 1) * 100 } })
        print("  steady exits: floor \(first.floor.steadyExits ?? 0), minivmm \(first.full.steadyExits ?? 0)"
              + (first.cFloor?.steadyExits.map { ", C floor \($0)" } ?? ""))
    }
}

/// The value of `key=` in the last `RESULT ` line of `text`, or `nil`.
func field(_ text: String, _ key: String) -> String? {
    guard let line = lastResultLine(text) else { return nil }
    for w in line.split(separator: " ") where w.hasPrefix(key + "=") { return String(w.dropFirst(key.count + 1)) }
    return nil
}

/// The last line of `text` that starts with `RESULT `, found from the end: a DMP run's output holds millions of
/// lines before it (splitting it all took most of a minute per run).
func lastResultLine(_ text: String) -> Substring? {
    let utf8 = text.utf8
    var end = utf8.endIndex
    while true {
        let start = utf8[..<end].lastIndex(of: UInt8(ascii: "\n")).map { utf8.index(after: $0) } ?? utf8.startIndex
        let line = Substring(utf8[start..<end])
        if line.hasPrefix("RESULT ") { return line }
        guard start > utf8.startIndex else { return nil }
        end = utf8.index(before: start)
    }
}

func median(_ v: [Double]) -> Double {
    let s = v.sorted()
    return s.isEmpty ? 0 : s[s.count / 2]
}

func fmt(_ v: Double) -> String {
    // Beyond an Int (a ratio over a guest-reported 0, an infinity) as Swift prints it: `Int(_:)` would trap.
    guard v.isFinite, v.magnitude < 9e18 else { return String(v) }
    if v >= 100 { return String(Int(v.rounded())) }
    let r = (v * 100).rounded() / 100
    return String(r)
}

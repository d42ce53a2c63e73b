import ArgumentParser
import DMP
import Logging
import Synchronization
import VMMKit

// The workload benchmark of `minivmm bench`: every workload under every
// variant, each variant with an iteration count calibrated to a steady phase
// of at least `--seconds`, runs interleaved, medians reported.
//
// Adding a variant is one entry in `BenchVariant.all` (a DMP variant adds its
// own keys, e.g. `patched_sites`, through `BenchRun.extra`).

/// A workload guest of `Guests/`.
struct BenchWorkload: Sendable {
    /// The image name (`Guests/NAME.elf`); the static-PV twin is `NAME-pv.elf`.
    let name: String
    /// The privilege level the workload's loop runs at.
    let cpl: Int
    /// Iteration counts are multiples of this (the doorbell submits batches of 16).
    let granularity: Int
    /// The iteration count of the first (probe) run.
    let probeIterations: Int
    /// The device register the loop writes (UART THR, the doorbell register):
    /// the `coalesced` variant puts a KVM coalesced zone on it.
    let coalescedZone: CoalescedZone
    /// Whether QEMU has the devices the workload needs.
    let runsUnderQEMU: Bool
    /// Whether the static-PV twin uses only ring 0 (the UART's), whose header stays where it is whatever the
    /// ring size (the doorbell twins use ring 1, at the default stride).
    var usesRing0Only: Bool { coalescedZone.isPIO }
    /// Whether `Guests/NAME-pv.elf` exists. The guests written in C have no
    /// static-PV twin: they are ordinary C programs, not rewritten by hand.
    var hasStaticPVTwin = true

    /// A workload whose loop writes the UART's THR (the coalesced zone), at CPL3 unless `cpl` says otherwise.
    static func uart(_ name: String, cpl: Int = 3, runsUnderQEMU: Bool = true, twin: Bool = false) -> BenchWorkload {
        BenchWorkload(name: name, cpl: cpl, granularity: 1, probeIterations: 40,
                      coalescedZone: CoalescedZone(address: 0x3f8, size: 1, isPIO: true), runsUnderQEMU: runsUnderQEMU,
                      hasStaticPVTwin: twin)
    }

    /// A workload whose loop writes the doorbell register (the coalesced zone), at CPL3; QEMU has no doorbell.
    static func doorbell(_ name: String, granularity: Int, twin: Bool = false) -> BenchWorkload {
        BenchWorkload(name: name, cpl: 3, granularity: granularity, probeIterations: 640,
                      coalescedZone: CoalescedZone(address: StandardDevices.doorbellBase + DoorbellDevice.doorbellOffset,
                                                   size: 4, isPIO: false),
                      runsUnderQEMU: false, hasStaticPVTwin: twin)
    }

    static let all: [BenchWorkload] = [
        uart("uart-cpl0", cpl: 0, twin: true),
        uart("uart-cpl3", twin: true),
        doorbell("doorbell-cpl3", granularity: 16, twin: true),
        // The guests written in C (gcc -O2, Guests/c-*.c): no static-PV twin.
        uart("c-uart-cpl3"),
        doorbell("c-doorbell-cpl3", granularity: 1),
        uart("c-selfmod-cpl3"),
        uart("c-poll-cpl3"),
        // The UART guest at -Os: its port accessors are reached only through function pointers (call promotion).
        uart("c-uart-cpl3-Os"),
        // Guests in styles of their own (own runtimes): switch jump tables and sink callbacks (not run under
        // QEMU by the bench); readl/writel to the doorbell with an unrolled batch loop.
        uart("c-table-cpl3", runsUnderQEMU: false),
        doorbell("c-mmio-cpl3", granularity: 16),
    ]

    /// `iterations` rounded up to the granularity, at least one granule.
    func rounded(_ iterations: Int) -> Int {
        BenchCalibration.rounded(iterations, granularity: granularity)
    }
}

/// What the variants share: the guest directory, QEMU if found, the TSC rate.
struct BenchEnvironment: Sendable {
    var guests: String
    var qemu: String?
    /// TSC ticks per nanosecond.
    var tscPerNanosecond: Double
    /// Slots per paravirtual ring of the in-process variants (`--ring-slots`).
    var ringSlots: UInt32 = 512
}

/// One run of a workload under a variant.
struct BenchRun: Sendable {
    /// The guest's total iterations (warm-up included), as it reports them.
    var iterations: Int
    /// The guest's steady-phase iterations (total minus warm-up), as it reports them.
    var steadyIterations: Int
    /// Guest-reported TSC cycles per steady-phase iteration.
    var cyclesPerIteration: Double
    /// The guest's checksum, as printed (`0x...`).
    var checksum: String
    /// Exits in the steady phase (nil where the VMM cannot count them: QEMU).
    var steadyExits: Int?
    /// Host CPU time of all the VMM's threads per steady-phase iteration, in nanoseconds.
    var hostCPUNanosecondsPerIteration: Double?
    /// The rings' fallbacks, kicks and poller sleeps in the steady phase (nil where the VMM cannot count them: QEMU).
    var steadyRing: RingCounters?
    /// Variant-specific values for the JSON record.
    var extra: [(key: String, value: JSONValue)] = []
}

/// A way to run a workload.
struct BenchVariant: Sendable {
    /// The variant's name in the table and the JSON (`variant`).
    let name: String
    /// Why the variant cannot run `workload` here, or nil when it can (said on stderr).
    let unavailable: @Sendable (BenchWorkload, BenchEnvironment) -> String?
    /// Whether the variant's cycles per iteration fall as its runs get longer (DMP patches during the guest's
    /// warm-up, a tenth of the iterations, so a short probe's steady phase runs partly unpatched): its
    /// calibration is confirmed by runs at the calibrated count, rescaled while one comes out short.
    var confirmsCalibration = false
    /// Runs the workload with `iterations` iterations.
    let run: @Sendable (BenchWorkload, Int, BenchEnvironment) throws -> BenchRun

    /// Every variant, in table and JSON order.
    static let all: [BenchVariant] = [full, staticPV, coalesced, dmp, qemu]

    /// minivmm, every access an exit.
    static let full = BenchVariant(name: "full", unavailable: { _, _ in nil }) { w, n, env in
        try runInProcess(env.guests + "/" + w.name + ".elf", iterations: n, ringSlots: env.ringSlots)
    }

    /// The static-PV twin: the same work through minivmm's ring device.
    static let staticPV = BenchVariant(name: "static-pv", unavailable: { w, env in
        if !w.hasStaticPVTwin { return "\(w.name) has no static-PV twin" }
        if !w.usesRing0Only, StandardDevices.ringStride(slotCount: env.ringSlots) != PVRingLayout.defaultStride {
            return "its twin finds the doorbell's ring at the default stride, which \(env.ringSlots) slots do not fit"
        }
        return nil
    }) { w, n, env in
        try runInProcess(env.guests + "/" + w.name + "-pv.elf", iterations: n, ringSlots: env.ringSlots)
    }

    /// minivmm with a KVM coalesced zone on the register the loop writes: the
    /// kernel batches those writes into a ring that minivmm drains before the
    /// next exit (the in-kernel alternative DMP must beat).
    static let coalesced = BenchVariant(name: "coalesced", unavailable: { _, _ in nil }) { w, n, env in
        try runInProcess(env.guests + "/" + w.name + ".elf", iterations: n, ringSlots: env.ringSlots) { vm in
            try vm.registerCoalescedZone(w.coalescedZone)
        }
    }

    /// minivmm with DMP on (user-mode fast paths enabled, as `minivmm run --dmp`):
    /// the same image as `full`, patched while it runs. Adds `patched_sites`
    /// (sites patched at the end of the run) and `warmup_exits` (exits before
    /// the guest's steady phase began: hotness threshold, locating, patching).
    static let dmp = BenchVariant(name: "dmp", unavailable: { _, _ in nil }, confirmsCalibration: true) { w, n, env in
        var middleware: DMPMiddleware?
        var devices: StandardDevices?
        var run = try runInProcess(env.guests + "/" + w.name + ".elf", iterations: n, ringSlots: env.ringSlots,
                                   afterLoad: { vm, d, loaded in
            var c = DMPConfiguration()
            c.use(loaded)
            c.userModeFastPaths = true
            c.lockedCounters = DMPOptions.lockedCounters
            var logger = Logger(label: "minivmm.bench.dmp")
            logger.logLevel = DMPOptions.logLevel
            middleware = DMPMiddleware.install(on: vm, rings: d.rings, configuration: c, logger: logger)
            devices = d
        })
        let report = middleware?.report() ?? []
        run.extra = [
            ("patched_sites", .int(report.filter { $0.state == .patched }.count)),
            ("warmup_exits", devices?.marker.marks.first { $0.value == 1 }.map { .int($0.exits) } ?? .null),
        ]
        return run
    }

    /// QEMU on the same image (`-accel kvm -cpu EPYC`, isa-debug-exit). Its
    /// host CPU time per iteration is estimated from whole-process CPU times
    /// (see ``QEMURunner``).
    static let qemu = BenchVariant(name: "qemu", unavailable: { w, env in
        if env.qemu == nil { return "qemu-system-x86_64 is not installed" }
        if !w.runsUnderQEMU { return "QEMU has no device for \(w.name)" }
        return nil
    }) { w, n, env in
        guard let q = env.qemu else { throw ValidationError("qemu-system-x86_64 is not installed") }
        return try QEMURunner.run(q, image: env.guests + "/" + w.name + ".elf", iterations: n)
    }
}

/// One workload/variant result: what the table and the JSON print.
struct BenchRecord: Sendable {
    var workload: String
    var cpl: Int
    var variant: String
    /// The guest's total iterations per run.
    var totalIterations: Int
    /// Steady-phase iterations per run.
    var iterations: Int
    /// Each run's cycles per iteration, in run order.
    var cyclesPerIterationRuns: [Double]
    var steadyExits: Int?
    /// Each run's steady-phase exits, in run order (empty where the VMM cannot count them).
    var steadyExitsRuns: [Int] = []
    /// Each run's steady-phase ring counters, in run order (empty where the VMM cannot count them).
    var steadyRingRuns: [RingCounters] = []
    var checksum: String
    /// The median steady phase, in seconds (guest TSC cycles over the host's TSC rate).
    var steadySeconds: Double
    /// Each run's steady phase, in seconds, in run order.
    var steadySecondsRuns: [Double] = []
    var hostCPUNanosecondsPerIteration: Double?
    var extra: [(key: String, value: JSONValue)]

    /// The median of the runs' cycles per iteration.
    var cyclesPerIteration: Double { median(cyclesPerIterationRuns) }

    /// The JSON object: the keys of issue 5, then the per-run values, then the variant's own.
    var json: JSONValue {
        var fields: [(String, JSONValue)] = [
            ("workload", .string(workload)),
            ("cpl", .int(cpl)),
            ("variant", .string(variant)),
            ("iterations", .int(iterations)),
            ("cycles_per_iter", .number(cyclesPerIteration)),
            ("steady_exits", steadyExits.map(JSONValue.int) ?? .null),
            ("checksum", .string(checksum)),
            ("runs", .int(cyclesPerIterationRuns.count)),
            ("host_cpu_ns_per_iter", hostCPUNanosecondsPerIteration.map(JSONValue.number) ?? .null),
            ("total_iterations", .int(totalIterations)),
            ("steady_seconds", .number(steadySeconds)),
            ("cycles_per_iter_runs", .array(cyclesPerIterationRuns.map(JSONValue.number))),
        ]
        if !steadySecondsRuns.isEmpty { fields.append(("steady_seconds_runs", .array(steadySecondsRuns.map(JSONValue.number)))) }
        if !steadyExitsRuns.isEmpty { fields.append(("steady_exits_runs", .array(steadyExitsRuns.map(JSONValue.int)))) }
        if !steadyRingRuns.isEmpty { fields.append(("steady_ring_runs", .array(steadyRingRuns.map(\.json)))) }
        fields += extra.map { ($0.key, $0.value) }
        return .object(fields)
    }
}

/// Options of the workload benchmark.
struct WorkloadBenchPlan: Sendable {
    var workloads: [BenchWorkload]
    var variants: [BenchVariant]
    /// Runs per variant (interleaved).
    var runs: Int
    /// The shortest steady phase to calibrate for, in seconds.
    var seconds: Double
    /// A fixed iteration count instead of calibration (uart; the doorbell uses 16x).
    var fixedIterations: Int?
    /// Progress lines go here (stderr).
    var progress: @Sendable (String) -> Void = { _ in }
}

/// Runs the plan: for each workload, a probe run of every variant at the same
/// iteration count (their checksums must agree), an iteration count per
/// variant scaled from its probe, then `runs` rounds, each running every variant once.
func runWorkloadBenchmark(_ plan: WorkloadBenchPlan, _ env: BenchEnvironment) throws -> [BenchRecord] {
    var records: [BenchRecord] = []
    for w in plan.workloads {
        let variants = plan.variants.filter { v in
            guard let why = v.unavailable(w, env) else { return true }
            printError("minivmm bench: no \(v.name) variant for \(w.name): \(why)")
            return false
        }
        guard !variants.isEmpty else { continue }
        var iterations: [Int] = []
        var probes: [BenchRun] = []
        let probeN = w.rounded(plan.fixedIterations.map { $0 * w.granularity } ?? w.probeIterations)
        for v in variants {
            plan.progress("\(w.name) \(v.name): probe, \(probeN) iterations")
            let p = try v.run(w, probeN, env)
            if let first = probes.first, first.checksum != p.checksum {
                throw ValidationError("\(w.name): \(v.name) gives checksum \(p.checksum), \(variants[0].name) \(first.checksum)")
            }
            probes.append(p)
            iterations.append(plan.fixedIterations == nil ? try calibrated(w, v, p, plan, env) : probeN)
        }
        // DMP's steady exits are judged against its twin's (no more than the twin's plus five): both run the larger
        // of their two iteration counts, so they do the same work and the machine's noise (a ring consumer off its
        // CPU, each costing a fallback exit per ring-full) has steady phases of the same length to land in.
        let partners = twinPartners(variants)
        for (i, j) in partners.enumerated() {
            if let j { iterations[i] = max(iterations[i], iterations[j]) }
        }
        let runs = try interleavedRuns(w, variants, iterations: iterations, partners: partners, plan, env)
        for (i, v) in variants.enumerated() {
            let rs = runs[i]
            guard let last = rs.last else { continue }
            let seconds = rs.map { BenchCalibration.steadySeconds($0, tscPerNanosecond: env.tscPerNanosecond) }
            if plan.fixedIterations == nil, let shortest = seconds.min(), shortest < plan.seconds {
                printError("minivmm bench: \(w.name) \(v.name): a steady phase lasted \(fmt(shortest)) s, under \(fmt(plan.seconds)) s")
            }
            let exits = rs.compactMap(\.steadyExits)
            let cpu = rs.compactMap(\.hostCPUNanosecondsPerIteration)
            records.append(BenchRecord(
                workload: w.name, cpl: w.cpl, variant: v.name, totalIterations: last.iterations,
                iterations: last.steadyIterations, cyclesPerIterationRuns: rs.map(\.cyclesPerIteration),
                steadyExits: exits.count == rs.count ? Int(median(exits.map(Double.init))) : nil,
                steadyExitsRuns: exits.count == rs.count ? exits : [],
                steadyRingRuns: rs.allSatisfy { $0.steadyRing != nil } ? rs.compactMap(\.steadyRing) : [],
                checksum: last.checksum, steadySeconds: median(seconds), steadySecondsRuns: seconds,
                hostCPUNanosecondsPerIteration: cpu.count == rs.count ? median(cpu) : nil,
                extra: last.extra))
        }
    }
    return records
}

/// For each variant, the index of the variant that must run the same iteration count: `dmp` and `static-pv`
/// of a workload pair up (DMP's steady exits are judged against its twin's), every other variant has none.
func twinPartners(_ variants: [BenchVariant]) -> [Int?] {
    let d = variants.firstIndex { $0.name == BenchVariant.dmp.name }
    let t = variants.firstIndex { $0.name == BenchVariant.staticPV.name }
    return variants.indices.map { i in
        guard let d, let t else { return nil }
        return i == d ? t : i == t ? d : nil
    }
}

/// `plan.runs` runs of every variant, interleaved (each round runs every variant that still needs runs once).
/// A run whose steady phase came out shorter than `plan.seconds` (a variant faster than its calibration said)
/// recalibrates that variant from the run (and its partner to the same count): the runs of both so far are
/// dropped and they run again, at most ``BenchCalibration/maximumRecalibrations`` times per variant; after that
/// a short run is kept and reported on stderr.
func interleavedRuns(_ w: BenchWorkload, _ variants: [BenchVariant], iterations initial: [Int], partners: [Int?],
                     _ plan: WorkloadBenchPlan, _ env: BenchEnvironment) throws -> [[BenchRun]] {
    var iterations = initial
    let target = max(1, plan.runs)
    var runs = Array(repeating: [BenchRun](), count: variants.count)
    var recalibrations = Array(repeating: 0, count: variants.count)
    // Each recalibration delays a variant and its partner by at most `target` rounds.
    let roundLimit = target * (1 + 2 * BenchCalibration.maximumRecalibrations + 1)
    var round = 0
    while round < roundLimit, runs.contains(where: { $0.count < target }) {
        round += 1
        for (i, v) in variants.enumerated() where runs[i].count < target {
            plan.progress("\(w.name) \(v.name): run \(runs[i].count + 1) of \(target), \(iterations[i]) iterations")
            let run = try v.run(w, iterations[i], env)
            if let first = runs[i].first, first.checksum != run.checksum {
                throw ValidationError("\(w.name) \(v.name): checksum changed between runs (\(first.checksum), \(run.checksum))")
            }
            if plan.fixedIterations == nil, recalibrations[i] < BenchCalibration.maximumRecalibrations,
               let n = BenchCalibration.lengthened(iterations[i], after: run, tscPerNanosecond: env.tscPerNanosecond,
                                                   seconds: plan.seconds, granularity: w.granularity) {
                recalibrations[i] += 1
                let seconds = BenchCalibration.steadySeconds(run, tscPerNanosecond: env.tscPerNanosecond)
                plan.progress("\(w.name) \(v.name): a steady phase lasted \(fmt(seconds)) s, under \(fmt(plan.seconds)) s: "
                              + "\(n) iterations from now on, its runs so far dropped")
                for j in [i] + [partners[i]].compactMap({ $0 }) {
                    iterations[j] = max(iterations[j], n)
                    runs[j] = []
                }
                continue
            }
            runs[i].append(run)
        }
    }
    return runs
}

/// The iteration count that makes `variant`'s steady phase last `plan.seconds`
/// (plus 40%), from a probe; probes again, ten times longer, while the probe's
/// steady phase is under 50 ms (too short to scale from), then once more at
/// the final count (the faster of the two counts). A variant that
/// ``BenchVariant/confirmsCalibration`` then runs at the calibrated count and is
/// rescaled from that run while its steady phase comes out shorter than
/// `plan.seconds` times ``BenchCalibration/confirmedShare`` (DMP: a probe's
/// short warm-up leaves part of its steady phase unpatched).
func calibrated(_ w: BenchWorkload, _ v: BenchVariant, _ probe: BenchRun, _ plan: WorkloadBenchPlan,
                _ env: BenchEnvironment) throws -> Int {
    var p = probe
    for _ in 0..<6 {
        let steadyNs = p.cyclesPerIteration / env.tscPerNanosecond * Double(p.steadyIterations)
        if steadyNs >= BenchCalibration.shortestScalableProbe || p.iterations >= 100_000_000 { break }
        let n = w.rounded(p.iterations * 10)
        plan.progress("\(w.name) \(v.name): probe, \(n) iterations")
        p = try v.run(w, n, env)
    }
    // A second probe at the final count: a probe slowed by the machine would give too few iterations.
    plan.progress("\(w.name) \(v.name): probe, \(p.iterations) iterations")
    let cycles = min(p.cyclesPerIteration, try v.run(w, p.iterations, env).cyclesPerIteration)
    var n = BenchCalibration.iterations(cyclesPerIteration: cycles, tscPerNanosecond: env.tscPerNanosecond,
                                        seconds: plan.seconds, granularity: w.granularity)
    guard v.confirmsCalibration else { return n }
    for _ in 0..<BenchCalibration.maximumConfirmations {
        plan.progress("\(w.name) \(v.name): confirming run, \(n) iterations")
        let run = try v.run(w, n, env)
        guard let longer = BenchCalibration.lengthened(
            n, after: run, tscPerNanosecond: env.tscPerNanosecond, seconds: plan.seconds, granularity: w.granularity,
            shortOf: plan.seconds * BenchCalibration.confirmedShare) else { break }
        plan.progress("\(w.name) \(v.name): its steady phase lasted "
                      + "\(fmt(BenchCalibration.steadySeconds(run, tscPerNanosecond: env.tscPerNanosecond))) s")
        n = longer
    }
    return n
}

/// Runs a workload image in this process with the standard devices and 64 MiB.
func runInProcess(_ image: String, iterations: Int, ringSlots: UInt32 = 512,
                  prepare: (VirtualMachine) throws -> Void = { _ in },
                  afterLoad: (VirtualMachine, StandardDevices, LoadedImage) throws -> Void = { _, _, _ in }) throws -> BenchRun {
    // The end of the output only: the RESULT line comes last, and a long run writes hundreds of megabytes.
    let out = OutputTail()
    let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
    let clock = SteadyPhaseCPUClock()
    vm.addExitHandler(clock)
    let devices = try StandardDevices.install(on: vm, console: out.sink(), ringSlotCount: ringSlots)
    clock.sampleRings(of: devices.rings)
    try prepare(vm)
    let loaded = try X86Boot.load(.elf(try readFile(image)), commandLine: "iters=\(iterations)", into: vm)
    try afterLoad(vm, devices, loaded)
    let reason = try vm.run()
    guard case .guestExit(0) = reason else {
        throw ValidationError("\(image) stopped with \(reason): \(out.text.suffix(200))")
    }
    var run = try BenchRun(result: out.text, image)
    run.steadyExits = devices.marker.steadyPhase?.exits
    run.steadyRing = clock.steadyRing
    run.hostCPUNanosecondsPerIteration = clock.steadyNanoseconds.map { Double($0) / Double(max(1, run.steadyIterations)) }
    return run
}

extension BenchRun {
    /// A run as the guest's RESULT line reports it (iterations, warm-up, cycles per iteration, checksum).
    /// The line is guest output: counts that are not `0 <= warmup < iters` and cycles that are not a finite
    /// number `>= 0` (`nan`, `inf` parse as numbers) are refused, as a missing line is.
    init(result text: String, _ what: String) throws {
        guard let c = field(text, "cycles_per_iter").flatMap(Double.init), let sum = field(text, "checksum"),
              let n = field(text, "iters").flatMap(Int.init), let w = field(text, "warmup").flatMap(Int.init) else {
            throw ValidationError("\(what): no RESULT line in its output: \(text.suffix(200))")
        }
        guard w >= 0, w < n, c.isFinite, c >= 0 else {
            throw ValidationError("\(what): implausible RESULT line (iters \(n), warmup \(w), cycles_per_iter \(c)): \(text.suffix(200))")
        }
        self.init(iterations: n, steadyIterations: n - w, cyclesPerIteration: c, checksum: sum)
    }
}

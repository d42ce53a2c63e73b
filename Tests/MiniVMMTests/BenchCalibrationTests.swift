import Synchronization
import Testing
@testable import minivmm

/// A simulated guest for the calibration: `slow` cycles per iteration until `patchedAfter` iterations of the run
/// have passed, `fast` after (DMP patching during the run; `patchedAfter` 0: always `fast`); the warm-up is a
/// tenth of the iterations, as in the guests. The checksum depends on the count, as the guests' does.
private func simulatedRun(_ n: Int, slow: Double, fast: Double, patchedAfter: Int) -> BenchRun {
    let warmup = n / 10
    let slowSteady = max(0, min(patchedAfter, n) - warmup)
    let steady = n - warmup
    let cycles = (slow * Double(slowSteady) + fast * Double(steady - slowSteady)) / Double(steady)
    return BenchRun(iterations: n, steadyIterations: steady, cyclesPerIteration: cycles, checksum: "0x\(n)")
}

/// The runs the simulated variants were asked for, in order ("NAME COUNT").
private final class CallLog: Sendable {
    private let calls = Mutex<[String]>([])
    func append(_ call: String) { calls.withLock { $0.append(call) } }
    var all: [String] { calls.withLock { $0 } }
}

/// A variant running ``simulatedRun`` and logging each count it was asked for.
private func simulatedVariant(_ name: String, confirms: Bool = false, log: CallLog,
                              cycles: @escaping @Sendable (Int, Int) -> BenchRun) -> BenchVariant {
    let calls = Mutex(0)
    return BenchVariant(name: name, unavailable: { _, _ in nil }, confirmsCalibration: confirms) { _, n, _ in
        let call = calls.withLock { c -> Int in c += 1; return c }
        log.append("\(name) \(n)")
        return cycles(call, n)
    }
}

@Suite("bench: calibration")
struct BenchCalibrationTests {
    @Test("the iteration count for a steady phase: seconds times the margin, over the steady tenth's complement, rounded up to the granularity")
    func iterations() {
        // 1,000 cycles per iteration at 1 cycle per ns: 1.4 s is 1.4 M steady iterations, 1,555,555.6 in all, plus a granule.
        #expect(BenchCalibration.iterations(cyclesPerIteration: 1000, tscPerNanosecond: 1, seconds: 1, granularity: 1)
                == 1_555_556)
        let n16 = BenchCalibration.iterations(cyclesPerIteration: 1000, tscPerNanosecond: 1, seconds: 1, granularity: 16)
        #expect(n16 % 16 == 0 && n16 >= 1_555_556 && n16 < 1_555_556 + 32)
        // 2.5 cycles per ns: the same cycles take 2.5 times less time, so 2.5 times more iterations.
        #expect(BenchCalibration.iterations(cyclesPerIteration: 2500, tscPerNanosecond: 2.5, seconds: 1, granularity: 1)
                == 1_555_556)
        // Capped, and never zero.
        #expect(BenchCalibration.iterations(cyclesPerIteration: 0, tscPerNanosecond: 1, seconds: 3600, granularity: 1)
                == 2_000_000_000)
        #expect(BenchCalibration.iterations(cyclesPerIteration: 1e15, tscPerNanosecond: 1, seconds: 1, granularity: 16) == 16)
        #expect(BenchCalibration.rounded(0, granularity: 16) == 16)
        #expect(BenchCalibration.rounded(17, granularity: 16) == 32)
    }

    @Test("a run shorter than the goal gives a larger count scaled from its own rate; a long enough run gives none")
    func lengthened() {
        // 900 steady iterations of 100,000 cycles at 1 cycle per ns: 0.09 s.
        let short = BenchRun(iterations: 1000, steadyIterations: 900, cyclesPerIteration: 100_000, checksum: "0x1")
        #expect(BenchCalibration.steadySeconds(short, tscPerNanosecond: 1) == 0.09)
        #expect(BenchCalibration.lengthened(1000, after: short, tscPerNanosecond: 1, seconds: 1, granularity: 1)
                == BenchCalibration.iterations(cyclesPerIteration: 100_000, tscPerNanosecond: 1, seconds: 1, granularity: 1))
        #expect(BenchCalibration.lengthened(1000, after: short, tscPerNanosecond: 1, seconds: 0.05, granularity: 1) == nil)
        // Short of a higher bar (a confirming run), scaled to the same goal.
        #expect(BenchCalibration.lengthened(1000, after: short, tscPerNanosecond: 1, seconds: 0.05, granularity: 1,
                                            shortOf: 0.1) == 1001)
        // Never smaller than the current count plus a granule, even when the rate says otherwise.
        #expect(BenchCalibration.lengthened(20_000, after: short, tscPerNanosecond: 1, seconds: 1, granularity: 16) == 20_016)
    }

    @Test("dmp calibrated from an unpatched probe is confirmed at its count and rescaled: every measured steady phase of every variant lasts the goal, dmp and its twin run the same count")
    func dmpConfirmed() throws {
        let log = CallLog()
        // c-mmio-cpl3's shape: unpatched 100,000 cycles per iteration, patched 5,000 after 5,000 iterations.
        let dmp = simulatedVariant("dmp", confirms: true, log: log) { _, n in
            simulatedRun(n, slow: 100_000, fast: 5_000, patchedAfter: 5_000)
        }
        let twin = simulatedVariant("static-pv", log: log) { _, n in simulatedRun(n, slow: 0, fast: 5_500, patchedAfter: 0) }
        let full = simulatedVariant("full", log: log) { _, n in simulatedRun(n, slow: 0, fast: 100_000, patchedAfter: 0) }
        let plan = WorkloadBenchPlan(workloads: [BenchWorkload.doorbell("c-mmio-cpl3", granularity: 16)],
                                     variants: [full, twin, dmp], runs: 3, seconds: 1, fixedIterations: nil)
        let env = BenchEnvironment(guests: "", qemu: nil, tscPerNanosecond: 1)
        let records = try runWorkloadBenchmark(plan, env)
        #expect(records.map { $0.variant } == ["full", "static-pv", "dmp"])
        for r in records {
            #expect(r.cyclesPerIterationRuns.count == 3)
            #expect(r.steadySecondsRuns.count == 3)
            #expect(r.steadySecondsRuns.allSatisfy { $0 >= 1 }, "\(r.variant): \(r.steadySecondsRuns)")
            #expect(r.totalIterations % 16 == 0)
        }
        #expect(records[1].totalIterations == records[2].totalIterations)
        // Without the confirming runs, dmp (and its twin) would have run the probe's count: 0.25 s.
        let probeCount = BenchCalibration.iterations(cyclesPerIteration: 100_000, tscPerNanosecond: 1, seconds: 1,
                                                     granularity: 16)
        #expect(records[2].totalIterations > probeCount)
        let confirming = log.all.filter { $0.hasPrefix("dmp") }.count - 3 - 2
        #expect((1...BenchCalibration.maximumConfirmations).contains(confirming), "\(log.all)")
    }

    @Test("a measured run shorter than the goal recalibrates its variant and its partner; their earlier runs are dropped")
    func shortRunRecalibrates() throws {
        let log = CallLog()
        // The twin's probes (four growing, one at the final count) see a machine twice as slow as its runs do.
        let twin = simulatedVariant("static-pv", log: log) { call, n in
            simulatedRun(n, slow: 0, fast: call <= 5 ? 11_000 : 5_500, patchedAfter: 0)
        }
        let dmp = simulatedVariant("dmp", log: log) { _, n in simulatedRun(n, slow: 0, fast: 10_000, patchedAfter: 0) }
        let plan = WorkloadBenchPlan(workloads: [BenchWorkload.uart("uart-cpl3", twin: true)],
                                     variants: [dmp, twin], runs: 2, seconds: 1, fixedIterations: nil)
        let records = try runWorkloadBenchmark(plan, BenchEnvironment(guests: "", qemu: nil, tscPerNanosecond: 1))
        #expect(records.map { $0.variant } == ["dmp", "static-pv"])
        for r in records {
            #expect(r.steadySecondsRuns.count == 2)
            #expect(r.steadySecondsRuns.allSatisfy { $0 >= 1 }, "\(r.variant): \(r.steadySecondsRuns)")
        }
        #expect(records[0].totalIterations == records[1].totalIterations)
        // dmp's first run (long enough) was dropped with the twin's short one: both ran three times after five probes.
        let calls = log.all
        #expect(calls.filter { $0.hasPrefix("dmp") }.count == 5 + 3, "\(calls)")
        #expect(calls.filter { $0.hasPrefix("static-pv") }.count == 5 + 3, "\(calls)")
    }

    @Test("with a fixed count nothing is recalibrated, however short the runs")
    func fixedCount() throws {
        let log = CallLog()
        let dmp = simulatedVariant("dmp", confirms: true, log: log) { _, n in simulatedRun(n, slow: 0, fast: 10, patchedAfter: 0) }
        let plan = WorkloadBenchPlan(workloads: [BenchWorkload.uart("uart-cpl3", twin: true)],
                                     variants: [dmp], runs: 2, seconds: 1, fixedIterations: 5)
        let records = try runWorkloadBenchmark(plan, BenchEnvironment(guests: "", qemu: nil, tscPerNanosecond: 1))
        #expect(records.first?.totalIterations == 5)
        #expect(log.all == ["dmp 5", "dmp 5", "dmp 5"])
    }
}

// The arithmetic of `minivmm bench`'s calibration: how many iterations make a
// variant's steady phase last `--seconds`, and when a run says the count was
// too small. Pure functions, unit-tested (Tests/MiniVMMTests).

/// How iteration counts are derived from runs.
enum BenchCalibration {
    /// Calibrated steady phases aim at `--seconds` times this (a run slowed by the machine still lasts long enough).
    static let margin = 1.4
    /// The part of a guest's iterations that is steady: the guest's warm-up is a tenth of them.
    static let steadyFraction = 0.9
    /// A probe whose steady phase is shorter than this (in nanoseconds) is too short to scale from.
    static let shortestScalableProbe = 50e6
    /// The most iterations a calibration asks for.
    static let iterationCap = 2e9
    /// The most times the runs of a variant are recalibrated because one came out short (its own runs; a
    /// recalibrated DMP variant also restarts its static-PV twin).
    static let maximumRecalibrations = 2
    /// A confirming run (``BenchVariant/confirmsCalibration``) shorter than `--seconds` times this recalibrates.
    static let confirmedShare = 1.15
    /// The most confirming runs per variant and workload.
    static let maximumConfirmations = 3

    /// The length of `run`'s steady phase in seconds (the guest's TSC runs at the host's rate: KVM, no TSC scaling).
    static func steadySeconds(_ run: BenchRun, tscPerNanosecond: Double) -> Double {
        run.cyclesPerIteration * Double(run.steadyIterations) / tscPerNanosecond / 1e9
    }

    /// The iteration count (a multiple of `granularity`) whose steady phase lasts `seconds` times ``margin`` at
    /// `cyclesPerIteration`.
    static func iterations(cyclesPerIteration: Double, tscPerNanosecond: Double, seconds: Double,
                           granularity: Int) -> Int {
        // `max` keeps a NaN (0 cycles at a TSC rate of 0): such a count scales as the fastest would.
        let perIteration = cyclesPerIteration / tscPerNanosecond
        let nanosecondsPerIteration = perIteration.isNaN ? 0.001 : max(perIteration, 0.001)
        let steadyNeeded = seconds * margin * 1e9 / nanosecondsPerIteration
        let total = min(steadyNeeded / steadyFraction + Double(granularity), iterationCap)
        return rounded(Int(total), granularity: granularity)
    }

    /// The iteration count to run instead of `current` when `run` (a run of `current` iterations) had a steady
    /// phase shorter than `shortOf` seconds (default `seconds`): scaled from the run's own cycles per iteration
    /// to `seconds` times ``margin``, and larger than `current`. Nil when the run lasted long enough (or the
    /// count is already at the cap).
    ///
    /// A variant whose cycles per iteration fall as its runs get longer (DMP: it patches during the warm-up,
    /// a tenth of the iterations, so a short probe's steady phase runs partly unpatched) is calibrated too
    /// low from its probe; its first run at the calibrated count runs patched, and this scales from that.
    static func lengthened(_ current: Int, after run: BenchRun, tscPerNanosecond: Double, seconds: Double,
                           granularity: Int, shortOf: Double? = nil) -> Int? {
        guard steadySeconds(run, tscPerNanosecond: tscPerNanosecond) < shortOf ?? seconds, Double(current) < iterationCap else {
            return nil
        }
        let n = iterations(cyclesPerIteration: run.cyclesPerIteration, tscPerNanosecond: tscPerNanosecond,
                           seconds: seconds, granularity: granularity)
        return max(n, rounded(current + granularity, granularity: granularity))
    }

    /// `iterations` rounded up to a multiple of `granularity`, at least one granule.
    static func rounded(_ iterations: Int, granularity: Int) -> Int {
        max(granularity, (iterations + granularity - 1) / granularity * granularity)
    }
}

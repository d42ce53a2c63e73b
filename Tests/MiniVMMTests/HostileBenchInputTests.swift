import ArgumentParser
import Testing
@testable import minivmm

// What a guest (its RESULT line) or a command line can hand minivmm's benchmarks that used to trap: an
// overflowing subtraction, `Int(_:)` of a NaN or an infinity, an addition near 2^64, a negative range.

@Suite("bench: hostile RESULT lines and sizes")
struct HostileBenchInputTests {
    private func run(_ fields: String) throws -> BenchRun {
        try BenchRun(result: "boot\nRESULT \(fields) checksum=0x1\n", "test guest")
    }

    @Test("a RESULT line with counts not 0 <= warmup < iters, or cycles not finite and >= 0, is refused")
    func implausibleResultLines() throws {
        // iters - warmup overflowed here (a trap) before the line was checked.
        #expect(throws: ValidationError.self) { try run("iters=9223372036854775807 warmup=-1 cycles_per_iter=5") }
        #expect(throws: ValidationError.self) { try run("iters=10 warmup=-1 cycles_per_iter=5") }
        #expect(throws: ValidationError.self) { try run("iters=-1 warmup=-5 cycles_per_iter=5") }
        #expect(throws: ValidationError.self) { try run("iters=10 warmup=10 cycles_per_iter=5") }
        // "nan" and "inf" parse as Doubles; a NaN reached Int(_:) in the calibration.
        #expect(throws: ValidationError.self) { try run("iters=10 warmup=2 cycles_per_iter=nan") }
        #expect(throws: ValidationError.self) { try run("iters=10 warmup=2 cycles_per_iter=inf") }
        #expect(throws: ValidationError.self) { try run("iters=10 warmup=2 cycles_per_iter=-3") }
        let r = try run("iters=10 warmup=2 cycles_per_iter=7.5")
        #expect(r.iterations == 10 && r.steadyIterations == 8 && r.cyclesPerIteration == 7.5)
        #expect(try run("iters=10 warmup=0 cycles_per_iter=0").steadyIterations == 10)
    }

    @Test("the calibration scales a run of 0 cycles at a TSC rate of 0 (a NaN) as the fastest, without trapping")
    func calibrationOfANaN() {
        let n = BenchCalibration.iterations(cyclesPerIteration: 0, tscPerNanosecond: 0, seconds: 1, granularity: 16)
        #expect(n == BenchCalibration.iterations(cyclesPerIteration: 0, tscPerNanosecond: 1, seconds: 1, granularity: 16))
        #expect(n > 0 && n % 16 == 0 && Double(n) <= BenchCalibration.iterationCap + 16)
    }

    @Test("numbers beyond an Int print as Swift prints them instead of trapping in Int(_:)")
    func formattingBeyondAnInt() {
        #expect(fmt(.infinity) == "inf")
        #expect(fmt(-.infinity) == "-inf")
        #expect(fmt(.nan) == "nan")
        #expect(fmt(1e300) == String(1e300))
        #expect(fmt(1234.4) == "1234")
        #expect(fmt(1.234) == "1.23")
    }

    @Test("bench-guards refuses a --working-set near 2^64 (working set + 16 MiB overflowed) and one that does not fit")
    func guardBenchWorkingSet() throws {
        #expect(throws: (any Error).self) { try GuardBench.parse(["--working-set", "18446744073709551615"]) }
        #expect(throws: (any Error).self) { try GuardBench.parse(["--memory", "64", "--working-set", "49"]) }
        #expect(try GuardBench.parse(["--memory", "64", "--working-set", "48"]).workingSet == 48)
        #expect(try GuardBench.parse([]).workingSet == 192)
    }

    @Test("exit-path and detector-bench refuse sizes that trap or exhaust memory")
    func benchSizes() throws {
        // The probe's buffer: 8 bytes per exit.
        #expect(throws: (any Error).self) { try ExitPathBench.parse(["--exits", "4611686018427387904"]) }
        #expect(throws: (any Error).self) { try ExitPathBench.parse(["--exits", "0"]) }
        #expect(throws: (any Error).self) { try ExitPathBench.parse(["--runs=-1"]) }
        #expect(try ExitPathBench.parse([]).exits == 100_000)
        // A negative loop count (0..<exits traps), an overflowing table size and address, a window ring too large.
        #expect(throws: (any Error).self) { try DetectorBench.parse(["--exits=-1"]) }
        #expect(throws: (any Error).self) { try DetectorBench.parse(["--cold-sites", "4611686018427387904"]) }
        #expect(throws: (any Error).self) { try DetectorBench.parse(["--window", "9223372036854775807"]) }
        #expect(throws: (any Error).self) { try DetectorBench.parse(["--threshold", "9223372036854775807"]) }
        let d = try DetectorBench.parse([])
        #expect(d.exits == 10_000_000 && d.coldSites == 1000 && d.threshold == 64 && d.window == 4096)
    }
}

import Foundation
import Testing
@testable import minivmm

/// Parses `minivmm bench --json` text into its records, or records why it could not.
func parseBenchJSON(_ text: String) throws -> [[String: Any]] {
    let value = try JSONSerialization.jsonObject(with: Data(text.utf8))
    guard let array = value as? [[String: Any]] else {
        Issue.record("not an array of objects: \(text.prefix(200))")
        return []
    }
    return array
}

/// The keys of issue 5 with the types they must have (`nil` allowed where a variant cannot measure).
func checkBenchRecord(_ r: [String: Any], runs: Int) {
    #expect(r["workload"] is String)
    #expect(r["variant"] is String)
    #expect([0, 3].contains(r["cpl"] as? Int))
    #expect((r["iterations"] as? Int).map { $0 > 0 } == true)
    #expect((r["cycles_per_iter"] as? Double).map { $0 > 0 } == true)
    #expect(r["steady_exits"] is Int || r["steady_exits"] is NSNull)
    let sum = r["checksum"] as? String ?? ""
    #expect(sum.count == 10 && sum.hasPrefix("0x") && sum.dropFirst(2).allSatisfy(\.isHexDigit), "checksum \(sum)")
    #expect(r["runs"] as? Int == runs)
    #expect(r["host_cpu_ns_per_iter"] is Double || r["host_cpu_ns_per_iter"] is NSNull)
    #expect((r["cycles_per_iter_runs"] as? [Double])?.count == runs)
    #expect(r["steady_seconds"] is Double)
}

@Suite("minivmm bench --json")
struct BenchJSONTests {
    let record = BenchRecord(workload: "uart-cpl3", cpl: 3, variant: "qemu", totalIterations: 200, iterations: 180,
                             cyclesPerIterationRuns: [5_022_001, 4_999_999.5, 5_100_000], steadyExits: nil,
                             checksum: "0x1472f3a9", steadySeconds: 0.35, hostCPUNanosecondsPerIteration: nil,
                             extra: [(key: "note", value: .string("a \"quoted\"\n\\ line\u{1}"))])

    @Test("records render as an array of objects with the documented keys and types")
    func shape() throws {
        var full = record
        full.variant = "full"
        full.steadyExits = 13_681
        full.steadyExitsRuns = [13_600, 13_681, 13_702]
        full.hostCPUNanosecondsPerIteration = 1234.5678
        let parsed = try parseBenchJSON(Bench.json([full, record]))
        #expect(parsed.count == 2)
        for r in parsed { checkBenchRecord(r, runs: 3) }
        #expect(parsed[0]["steady_exits"] as? Int == 13_681)
        #expect(parsed[1]["steady_exits"] is NSNull)
        #expect(parsed[0]["steady_exits_runs"] as? [Int] == [13_600, 13_681, 13_702])
        #expect(parsed[1]["steady_exits_runs"] == nil)
        #expect(parsed[1]["host_cpu_ns_per_iter"] is NSNull)
        #expect(parsed[0]["cycles_per_iter"] as? Double == 5_022_001)
        #expect(parsed[1]["note"] as? String == "a \"quoted\"\n\\ line\u{1}")
    }

    @Test("no records render as an empty array")
    func empty() throws {
        #expect(try parseBenchJSON(Bench.json([])).isEmpty)
    }

    @Test("numbers that JSON cannot hold render as null")
    func nonFinite() throws {
        var r = record
        r.cyclesPerIterationRuns = [.nan]
        r.hostCPUNanosecondsPerIteration = .infinity
        let parsed = try parseBenchJSON(Bench.json([r]))
        #expect(parsed.first?["cycles_per_iter"] is NSNull)
        #expect(parsed.first?["host_cpu_ns_per_iter"] is NSNull)
    }

    @Test("the options: --json, --runs, variants and workloads by name; unknown names refused")
    func options() throws {
        let b = try Bench.parse(["--json", "--runs", "3", "--variants", "full", "coalesced", "--workloads", "uart-cpl0"])
        #expect(b.json && b.runs == 3)
        #expect(b.plan.variants.map(\.name) == ["full", "coalesced"])
        #expect(b.plan.workloads.map(\.name) == ["uart-cpl0"])
        #expect(throws: (any Error).self) { try Bench.parse(["--variants", "bogus"]) }
        #expect(throws: (any Error).self) { try Bench.parse(["--runs", "0"]) }
        #expect(try Bench.parse([]).variants == BenchVariant.all.map(\.name))
    }

    @Test("--ring-slots: a power of two up to 32,768; above 512 the doorbell twins are left out, the UART twins run")
    func ringSlots() throws {
        #expect(try Bench.parse([]).ringSlots == 512)
        #expect(try Bench.parse(["--ring-slots", "4096"]).ringSlots == 4096)
        for bad in ["1000", "1", "65536"] {
            #expect(throws: (any Error).self) { try Bench.parse(["--ring-slots", bad]) }
        }
        #expect(try Run.parse(["--ring-slots", "8192"]).guest.ringSlots == 8192)
        #expect(throws: (any Error).self) { try Run.parse(["--ring-slots", "3"]) }
        let uart = try #require(BenchWorkload.all.first { $0.name == "uart-cpl3" })
        let doorbell = try #require(BenchWorkload.all.first { $0.name == "doorbell-cpl3" })
        var env = BenchEnvironment(guests: "", qemu: nil, tscPerNanosecond: 1)
        #expect(BenchVariant.staticPV.unavailable(uart, env) == nil)
        #expect(BenchVariant.staticPV.unavailable(doorbell, env) == nil)
        env.ringSlots = 4096
        #expect(BenchVariant.staticPV.unavailable(uart, env) == nil)
        #expect(BenchVariant.staticPV.unavailable(doorbell, env) != nil)
    }
}

@Suite("bench: the RESULT line of a run's output")
struct ResultLineTests {
    @Test("the last RESULT line wins, found from the end; its fields are read; none, or none at a line start, is nil")
    func lastResult() {
        let text = "boot\nRESULT iters=1 checksum=0x1\nline\nRESULT iters=10 warmup=2 cycles_per_iter=7 checksum=0xab\ndone\n"
        #expect(lastResultLine(text) == "RESULT iters=10 warmup=2 cycles_per_iter=7 checksum=0xab")
        #expect(field(text, "iters") == "10")
        #expect(field(text, "checksum") == "0xab")
        #expect(field(text, "missing") == nil)
        #expect(lastResultLine("RESULT a=1") == "RESULT a=1", "the first line, no newline")
        #expect(lastResultLine("no result\n x RESULT a=1\n") == nil)
        #expect(lastResultLine("") == nil)
        let long = String(repeating: "line 00000: the quick brown fox\n", count: 200_000) + "RESULT iters=3 warmup=1\n"
        #expect(field(long, "warmup") == "1")
    }
}

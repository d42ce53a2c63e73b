import Foundation
import Testing
import VMMKit
@testable import minivmm

extension KVMTests {
    @Test("bench --json on real KVM: an object per workload and in-process variant, shapes and checksums right; qemu absent when not installed")
    func benchJSON() throws {
        let plan = WorkloadBenchPlan(
            workloads: BenchWorkload.all.filter { ["uart-cpl3", "doorbell-cpl3"].contains($0.name) },
            variants: BenchVariant.all, runs: 2, seconds: 1, fixedIterations: 1)
        let env = BenchEnvironment(guests: guestsDirectory, qemu: nil, tscPerNanosecond: 1)
        let text = Bench.json(try runWorkloadBenchmark(plan, env))
        let value = try JSONSerialization.jsonObject(with: Data(text.utf8))
        let records = try #require(value as? [[String: Any]])
        #expect(records.map { "\($0["workload"] ?? "") \($0["variant"] ?? "")" } == [
            "uart-cpl3 full", "uart-cpl3 static-pv", "uart-cpl3 coalesced", "uart-cpl3 dmp",
            "doorbell-cpl3 full", "doorbell-cpl3 static-pv", "doorbell-cpl3 coalesced", "doorbell-cpl3 dmp",
        ])
        for r in records where r["variant"] as? String == "dmp" {
            #expect(r["patched_sites"] is Int)
            #expect(r["warmup_exits"] is Int || r["warmup_exits"] is NSNull)
        }
        for r in records {
            #expect(r["cpl"] as? Int == 3)
            #expect(r["runs"] as? Int == 2)
            #expect(r["steady_exits"] is Int)
            #expect(r["host_cpu_ns_per_iter"] is Double)
            #expect((r["cycles_per_iter"] as? Double).map { $0 > 0 } == true)
            #expect((r["cycles_per_iter_runs"] as? [Double])?.count == 2)
            #expect((r["steady_seconds_runs"] as? [Double])?.count == 2)
        }
        // iters=1 gives one UART line (no warm-up), iters=16 one doorbell batch.
        for r in records where r["workload"] as? String == "uart-cpl3" {
            #expect(r["iterations"] as? Int == 1)
        }
        for r in records where r["workload"] as? String == "doorbell-cpl3" {
            #expect(r["iterations"] as? Int == 16)
            #expect(r["checksum"] as? String == "0x187b11fc")
        }
        // Every variant of a workload agrees on the checksum (the plan checks it too).
        let uart = Set(records.filter { $0["workload"] as? String == "uart-cpl3" }.compactMap { $0["checksum"] as? String })
        #expect(uart.count == 1)
    }
}

extension KVMTests {
    @Test("the exit floor runs uart-cpl3 to its reference checksum with as many steady exits as minivmm")
    func exitFloor() throws {
        let env = BenchEnvironment(guests: guestsDirectory, qemu: nil, tscPerNanosecond: 1)
        let workload = try #require(BenchWorkload.all.first { $0.name == "uart-cpl3" })
        let pairs = try ExitFloor.pairs(workload, iterations: 20, pairs: 2, cProgram: nil, env) { _ in }
        #expect(pairs.count == 2)
        for p in pairs {
            #expect(p.floor.checksum == "0xa0787dcd")
            #expect(p.full.checksum == "0xa0787dcd")
            #expect(p.floor.steadyIterations == 18)
            // 18 lines of 38 bytes, an LSR read and a THR write per byte, plus the closing mark.
            #expect(p.floor.steadyExits == 18 * 38 * 2 + 1)
            #expect(p.floor.steadyExits == p.full.steadyExits)
            #expect(p.floor.cyclesPerIteration > 0)
        }
    }
}

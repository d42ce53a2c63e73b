import Foundation
import Glibc
import Testing
import VMMKit
@testable import minivmm

@Suite("minivmm --realtime-priority")
struct RealtimeOptionTests {
    @Test("bench and run take a priority in range; bench's default is the host's default policy")
    func parsing() throws {
        #expect(try Bench.parse([]).realtimePriority == 0)
        #expect(try Bench.parse(["--realtime-priority", "1"]).realtimePriority == 1)
        #expect(throws: (any Error).self) { try Bench.parse(["--realtime-priority", "100"]) }
        #expect(try Run.parse([]).guest.realtimePriority == nil)
        #expect(try Run.parse(["--realtime-priority", "99"]).guest.realtimePriority == 99)
        #expect(throws: (any Error).self) { try Run.parse(["--realtime-priority", "0"]) }
    }

    @Test("the real-time policy is refused, with the reason and nothing changed, without a host CPU per busy thread")
    func refusedWithoutCPUs() {
        let before = sched_getscheduler(0)
        let outcome = becomeRealtime(priority: 1, busyThreads: 100_000)
        #expect(!outcome.applied && outcome.reason?.contains("host CPUs") == true, "\(outcome)")
        #expect(outcome.refusal == .tooFewCPUs(busyThreads: 100_000, allowed: VirtualMachine.allowedHostCPUs.count))
        #expect(sched_getscheduler(0) == before)
    }

    @Test("stderr says whether SCHED_FIFO was applied, and if not why: the errno's name and text, with the capability and RLIMIT_RTPRIO for EPERM")
    func messages() {
        #expect(RealtimeOutcome(priority: 50).message("minivmm")
                == "minivmm: --realtime-priority 50 applied: minivmm's threads (vCPUs, ring poller, timer) run under SCHED_FIFO 50")
        let eperm = RealtimeOutcome(priority: 50, refusal: .host(errno: EPERM, text: "Operation not permitted", rtprioLimit: 0))
        #expect(eperm.message("bench") == "bench: --realtime-priority 50 not applied (the host's default policy stays): "
                + "pthread_setschedparam failed with EPERM (Operation not permitted): it needs CAP_SYS_NICE, or RLIMIT_RTPRIO "
                + "of at least 50 (it is 0; raise it with ulimit -r or limits.conf's rtprio)")
        let unlimited = RealtimeOutcome(priority: 50, refusal: .host(errno: EPERM, text: "Operation not permitted", rtprioLimit: nil))
        #expect(unlimited.reason?.hasSuffix("RLIMIT_RTPRIO of at least 50") == true, "\(String(describing: unlimited.reason))")
        let other = RealtimeOutcome(priority: 7, refusal: .host(errno: EINVAL, text: "Invalid argument", rtprioLimit: nil))
        #expect(other.reason == "pthread_setschedparam failed with EINVAL (Invalid argument)")
        #expect(RealtimeOutcome(priority: 7, refusal: .host(errno: 4242, text: "?", rtprioLimit: nil)).errnoName == "errno 4242")
        let cpus = RealtimeOutcome(priority: 9, refusal: .tooFewCPUs(busyThreads: 3, allowed: 2))
        #expect(cpus.message("minivmm") == "minivmm: --realtime-priority 9 not applied (the host's default policy stays): "
                + "3 busy threads (vCPUs and the ring poller) need as many host CPUs; 2 allowed")
        #expect(cpus.errnoName == nil)
    }

    @Test("bench --json gives every record a realtime field: null when not asked for, else the priority, applied, and for a refusal the errno and the reason")
    func jsonField() throws {
        let record = BenchRecord(workload: "uart-cpl3", cpl: 3, variant: "dmp", totalIterations: 200, iterations: 180,
                                 cyclesPerIterationRuns: [5_000], steadyExits: 3, checksum: "0x1472f3a9", steadySeconds: 0.3,
                                 hostCPUNanosecondsPerIteration: nil, extra: [])
        func field(_ r: RealtimeOutcome?) throws -> Any? {
            let parsed = try parseBenchJSON(Bench.json([record, record], realtime: r))
            #expect(parsed.count == 2)
            for p in parsed { checkBenchRecord(p, runs: 1) }
            return try #require(parsed.first)["realtime"]
        }
        #expect(try field(nil) is NSNull)
        let applied = try #require(try field(RealtimeOutcome(priority: 50)) as? [String: Any])
        #expect(applied["priority"] as? Int == 50 && applied["applied"] as? Bool == true && applied.count == 2, "\(applied)")
        let eperm = RealtimeOutcome(priority: 50, refusal: .host(errno: EPERM, text: "Operation not permitted", rtprioLimit: 0))
        let refused = try #require(try field(eperm) as? [String: Any])
        #expect(refused["applied"] as? Bool == false && refused["errno"] as? String == "EPERM", "\(refused)")
        #expect((refused["reason"] as? String)?.contains("CAP_SYS_NICE") == true, "\(refused)")
        let cpus = try #require(try field(RealtimeOutcome(priority: 50, refusal: .tooFewCPUs(busyThreads: 2, allowed: 1))) as? [String: Any])
        #expect(cpus["errno"] is NSNull && (cpus["reason"] as? String)?.contains("1 allowed") == true, "\(cpus)")
        #expect(Bench.json([record], realtime: RealtimeOutcome(priority: 1)).contains("\"realtime\": {\"priority\":1,\"applied\":true}"))
    }
}

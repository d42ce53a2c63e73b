import Glibc
import Testing
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
        let refused = becomeRealtime(priority: 1, busyThreads: 100_000)
        #expect(refused?.contains("host CPUs") == true, "\(String(describing: refused))")
        #expect(sched_getscheduler(0) == before)
    }
}

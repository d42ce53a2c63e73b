import DMP
import Testing
import VMMKit

extension KVMTests {
    @Test("c-doorbell-cpl3 with the vCPU and the ring poller pinned to one host CPU: the synchronous append's patch costs more per access than the exit it replaced (its waits counted) and is undone with that reason; output identical to DMP off")
    func dmpSynchronousAppendOneCPUUndone() throws {
        let cpu = try #require(VirtualMachine.allowedHostCPUs.last, "the host reported no CPU affinity")
        let commandLine = "iters=2000 warmup=200"
        let off = try DMPLibraryRun("c-doorbell-cpl3", commandLine: commandLine, dmp: false)
        let on = try DMPLibraryRun("c-doorbell-cpl3", commandLine: commandLine, hostCPUs: [cpu]) {
            $0.initialBackoff = 1 << 20   // the decision stays as it is for the rest of the run
        }
        #expect(off.stop == .guestExit(status: 0))
        #expect(on.stop == off.stop)
        #expect(on.lines == off.lines)
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum"))
        let s = try #require(on.site("db_run+0x50"), "\(on.report.map(\.description))")
        #expect(s.fastPath.contains("synchronous"), "\(s)")
        #expect(s.state == .undone, "\(s)")
        #expect(s.refusal?.stage == .verify, "\(String(describing: s.refusal))")
        #expect(s.refusal?.reason.contains("slower with the patch") == true && s.refusal?.reason.contains("exits per access") == true,
                "\(String(describing: s.refusal))")
        #expect(s.waitIterations > 0, "\(s)")
        #expect(s.windowsJudged >= DMPConfiguration().verifyLosingWindows, "\(s)")
        #expect(s.lastWindowCost.map { $0 > DMPConfiguration().verifyCostLimit } == true, "\(s)")
    }

    @Test("a synchronous append waits at most DMPConfiguration.synchronousWaitLimit iterations, then kicks: with the poller pinned to the vCPU's host CPU (it cannot apply an entry while the vCPU spins) every append waits the whole bound; output identical to DMP off")
    func dmpSynchronousWaitBounded() throws {
        let cpu = try #require(VirtualMachine.allowedHostCPUs.last, "the host reported no CPU affinity")
        let limit = 16
        let commandLine = "iters=2000 warmup=200"
        let off = try DMPLibraryRun("c-doorbell-cpl3", commandLine: commandLine, dmp: false)
        let on = try DMPLibraryRun("c-doorbell-cpl3", commandLine: commandLine, hostCPUs: [cpu]) {
            $0.synchronousWaitLimit = limit
            $0.initialBackoff = 1 << 20
        }
        #expect(on.stop == off.stop)
        #expect(on.lines == off.lines)
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum"))
        let s = try #require(on.site("db_run+0x50"), "\(on.report.map(\.description))")
        #expect(s.fastPath.contains("synchronous"), "\(s)")
        #expect(s.kicksWhilePatched > 0, "a wait that ran out kicks: \(s)")
        #expect(s.waitIterations > 0, "\(s)")
        let appends = s.hitsServed + UInt64(s.kicksWhilePatched)
        #expect(s.waitIterations <= UInt64(limit) * appends, "at most \(limit) iterations per append: \(s)")
    }

    @Test("a patch that pays stays patched: uart-cpl3's copy of uart_putc is judged in window after window over its life, never undone")
    func dmpPayingPatchStays() throws {
        // Long enough for a dozen 20 ms verification ticks after the patch (uart-cpl3 at DMP speed; transparency
        // against DMP off is checked by the shorter runs of the other tests: 40,000 iterations without DMP take minutes).
        let on = try DMPLibraryRun("uart-cpl3", commandLine: "iters=40000")
        #expect(on.stop == .guestExit(status: 0))
        #expect(resultField(on.text, "checksum") != nil)
        for location in ["uart_putc+0x5", "uart_putc+0x12"] {
            let s = try #require(on.site(location), "\(on.report.map(\.description))")
            #expect(s.state == .patched && s.refusal == nil, "\(s)")
            #expect(s.windowsJudged >= 3, "\(s)")
            #expect(s.waitIterations == 0 && s.kicksWhilePatched <= s.exitsWhilePatched)
            #expect(s.lastWindowCost.map { $0 <= DMPConfiguration().verifyCostLimit } == true, "\(s)")
        }
    }
}

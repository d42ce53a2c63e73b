import DMP
import Testing
import Synchronization
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
        let s = try #require(on.site("db_run+0x4d"), "\(on.report.map(\.description))")
        #expect(s.fastPath.contains("synchronous"), "\(s)")
        // Undone with its copy, or turned off alone where the copy also serves the STATUS read by then and that pays.
        #expect(s.state == .undone || s.state == .disabled, "\(s)")
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
        let s = try #require(on.site("db_run+0x4d"), "\(on.report.map(\.description))")
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
        for location in ["uart_putc+0x5", "uart_putc+0x11"] {
            let s = try #require(on.site(location), "\(on.report.map(\.description))")
            #expect(s.state == .patched && s.refusal == nil, "\(s)")
            #expect(s.windowsJudged >= 3, "\(s)")
            #expect(s.waitIterations == 0 && s.kicksWhilePatched <= s.exitsWhilePatched)
            #expect(s.lastWindowCost.map { $0 <= DMPConfiguration().verifyCostLimit } == true, "\(s)")
        }
    }
}

extension KVMTests {
    @Test("c-doorbell-cpl3 with no thread polling the rings: the DOORBELL store's synchronous append can never be served (every access falls back), so in db_run's copy it loses alone and is turned off alone; the copy stays and keeps serving the STATUS read; unpatchAll restores everything; output identical to DMP off")
    func dmpLosingSiteTurnedOffAlone() throws {
        let commandLine = "iters=8192 warmup=1024"
        let off = try DMPLibraryRun("c-doorbell-cpl3", commandLine: commandLine, dmp: false, ringPolling: .disabled)
        let before = Mutex<[PatchSite]>([])
        let guardsAfter = Mutex<[UInt64]?>(nil)
        let on = try DMPLibraryRun("c-doorbell-cpl3", commandLine: commandLine, ringPolling: .disabled, configure: { c in
            // The store's first patch (a copy serving it alone) is undone whole; after this back-off it joins the
            // copy that serves the STATUS read, loses there, and stays off (its second undo).
            c.initialBackoff = 256
            c.maximumUndos = 2
        }, around: { _, _, dmp, run in
            let stop = try run()
            before.withLock { $0 = dmp?.report() ?? [] }
            dmp?.unpatchAll()
            guardsAfter.withLock { $0 = dmp?.testSeam.patcher.guardedPages }
            return stop
        })
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop)
        #expect(on.lines == off.lines)
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum"))
        let report = before.withLock { $0 }
        let text = DMPReport.text(report)
        let doorbell = try #require(report.first { $0.location == "db_run+0x4d" }, "\(text)")
        let status = try #require(report.first { $0.site.kind == .mmio && $0.site.address == DoorbellExitCounter.status.rawValue }, "\(text)")
        #expect(doorbell.fastPath.contains("synchronous"), "\(doorbell)")
        // Off once (its first copy served it with the STATUS read already) or twice (turned on again after its back-off).
        #expect(doorbell.state == .disabled && (1...2).contains(doorbell.turnedOff), "\(doorbell.turnedOff) \(text)")
        let why = doorbell.refusal?.reason ?? ""
        #expect(doorbell.refusal?.stage == .verify && why.contains("slower with the patch")
                && why.contains("turned off alone, the copy of db_run serves its other sites on")
                && why.contains("never turned on again"), "\(text)")
        #expect(doorbell.hitsServed == 0 && doorbell.exitsWhilePatched > 0, "\(doorbell)")
        #expect(status.state == .patched && status.hitsServed > 0 && status.fastPath.hasPrefix("shared slot"), "\(text)")
        #expect(status.strategy == doorbell.strategy && status.strategy.hasPrefix("function copy of db_run"), "\(text)")
        #expect(text.contains("undone (did not pay)"), "\(text)")
        // unpatchAll took the copy out, with the site that was off: no guard left, every row undone.
        #expect(guardsAfter.withLock { $0 } == [])
        #expect(on.report.allSatisfy { $0.state != .patched && $0.state != .disabled }, "\(on.report.map(\.description))")
    }
}

import DMP
import Testing
import VMMKit

/// C guests in the idioms of real MMIO drivers, written from memory on the doorbell device (`Guests/c-virtio-notify-cpl3.c`,
/// `Guests/c-nvme-sqdb-cpl3.c`; the scratch sweep of /work/scratch/mmiodrv also imitated e1000's TDT write and flush,
/// ixgbe's register accessors with polled waits and a platform driver's `struct resource` with lib/iomap's `iowrite32`).
/// DMP needed no change for them: these tests keep them served.
extension KVMTests {
    /// The DOORBELL store sits in the transport's notify callback, reached only through `vq->notify`, with the
    /// virtqueue's RAM updates and barriers before it and a spin on the completion in RAM after it.
    @Test("c-virtio-notify-cpl3 (virtio-mmio's notify callback, gcc -O2): the QUEUE_NOTIFY writel in vm_notify_with_data is served by a function copy, over 90% of the steady exits gone, same output")
    func dmpVirtioNotifyCallback() throws {
        let off = try DMPLibraryRun("c-virtio-notify-cpl3", commandLine: "iters=4000", dmp: false)
        // Verification off: this is about what the plan serves (a synchronous append under load is the verifier's).
        let on = try DMPLibraryRun("c-virtio-notify-cpl3", commandLine: "iters=4000", pollerIdle: 1_000_000_000) { $0.verify = false }
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop)
        let text = DMPReport.text(on.report)
        let notify = on.report.filter { $0.site.kind == .mmio && $0.site.address == 0xd000_0040 }
        #expect(notify.count == 1, "\(text)")
        for s in notify {
            #expect(s.state == .patched && s.strategy.hasPrefix("function copy of vm_notify_with_data") && s.hitsServed > 3_000, "\(text)")
        }
        // 3,600 steady DOORBELL stores without DMP; at most a tenth of them left with it.
        #expect((off.steadyExits ?? 0) >= 3_600)
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10, kicksExcluded: true)
    }

    /// The submission doorbell's address is computed from CAP's stride (`&dbs[qid * 2 * stride]`) and written by
    /// `nvme_submit_cmd` for every command; the CQ-head doorbell one stride further (0x44) is a register the device
    /// ignores and offers no fast path for: refused with that reason, its exits (one per four commands) stay.
    @Test("c-nvme-sqdb-cpl3 (NVMe's strided doorbells, gcc -O2): the SQ tail doorbell is served, the CQ head doorbell refused (no fast path), the steady exits left are the CQ head's, same output")
    func dmpNVMeStridedDoorbells() throws {
        let off = try DMPLibraryRun("c-nvme-sqdb-cpl3", commandLine: "iters=4000", dmp: false)
        let on = try DMPLibraryRun("c-nvme-sqdb-cpl3", commandLine: "iters=4000", pollerIdle: 1_000_000_000) { $0.verify = false }
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop)
        let text = DMPReport.text(on.report)
        let sq = on.report.filter { $0.site.kind == .mmio && $0.site.address == 0xd000_0040 }
        #expect(sq.count == 1 && sq.allSatisfy { $0.state == .patched && $0.hitsServed > 3_000 }, "\(text)")
        let cq = on.report.filter { $0.site.kind == .mmio && $0.site.address == 0xd000_0044 }
        #expect(cq.count == 1, "\(text)")
        #expect(cq.allSatisfy { $0.state == .refused && $0.refusal?.reason.contains("offers no fast path") == true }, "\(text)")
        #expect(on.lines == off.lines)
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum"))
        // Steady phase: 3,600 SQ doorbells (fast path) and 900 CQ-head doorbells (none). Without DMP all 4,500
        // exit; with it the CQ head's 900 and at most a tenth of the SQ doorbells.
        let offExits = try #require(off.steadyExits)
        let onExits = try #require(on.steadyExits) - on.steadyKicks
        #expect(offExits >= 4_500, "\(offExits)")
        #expect(onExits < 900 + 3_600 / 10, "steady exits \(onExits) with DMP besides \(on.steadyKicks) kicks, \(offExits) without")
    }
}

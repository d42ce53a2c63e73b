import DMP
import Testing
import VMMKit

extension KVMTests {
    @Test("on a full ring with no consumer polling, DMP's ring-append body falls back as the static-PV twin's ring_push does: the same steady exits, every one a ring-full fallback, no kick")
    func dmpRingFullLikeTwin() throws {
        // Four slots and no poller: a producer fills the ring, the fifth byte finds it full and nobody polling and
        // performs the original THR write (an exit that drains the four first). Only the drain timer changes the
        // pattern (a drain between two bytes saves one exit), in both runs alike.
        let twin = try DMPGuestRun("uart-cpl3-pv", commandLine: "iters=400", dmp: nil, ringPolling: .disabled, ringSlotCount: 4)
        let twinStop = try twin.run()
        let dmp = try DMPGuestRun("uart-cpl3", commandLine: "iters=400", dmp: DMPGuestRun.configuration(),
                                  ringPolling: .disabled, ringSlotCount: 4)
        #expect(try dmp.run() == twinStop)
        #expect(resultField(dmp.console.text, "checksum") == resultField(twin.console.text, "checksum"))
        let report = DMPReport.text(dmp.dmp?.report() ?? [])
        let thr = try #require(dmp.sites(in: "uart_putc").first { $0.site.address == 0x3f8 }, "\(report)")
        #expect(thr.state == .patched && thr.hitsServed > 1000 && thr.exitsWhilePatched > 100, "\(report)")
        let twinExits = try #require(twin.devices.marker.steadyPhase?.exits)
        let dmpExits = try #require(dmp.devices.marker.steadyPhase?.exits)
        // 360 steady lines of 38 bytes: one exit per five bytes.
        #expect(twinExits > 2_300 && twinExits < 2_800, "\(twinExits)")
        #expect(abs(dmpExits - twinExits) <= twinExits / 20 + 5, "steady exits: dmp \(dmpExits), twin \(twinExits)")
        for run in [twin, dmp] {
            let s = run.devices.rings.statistics(ring: 0)
            // Every fallback but a few found the ring full. The others: the twin's RESULT line, which it writes to
            // THR directly (once the rings carried entries every THR write counts), and writes just after a drain
            // timer emptied the ring.
            #expect(s.fallbacks > 2_300 && s.fallbacks - s.fallbacksRingFull < 300, "\(s)")
            #expect(s.fallbacksConsumerIdle == 0 && run.devices.rings.kicks == 0, "\(s)")
        }
    }
}

import DMP
import Testing
import VMMKit

extension KVMTests {
    /// `lockstep=1`: each vCPU waits (in the guest, at CPL3) for the other at the end of every phase, so both run
    /// phase k together, the other one either calling its own site or spinning at the barrier, however the host
    /// schedules the two vCPU threads (a loaded 2-core host may run one vCPU's whole workload before the other's).
    @Test("DMP with two vCPUs busy at CPL3 (smp-cpl3 lockstep=1): every site of both vCPUs patched while the other runs, in phase order, each vCPU's checksum identical to DMP off")
    func dmpTwoBusyVCPUs() throws {
        let commandLine = "sites=12 iters=8192 spin=0 lockstep=1"
        let off = try DMPLibraryRun("smp-cpl3", commandLine: commandLine, dmp: false, cpus: 2)
        let on = try DMPLibraryRun("smp-cpl3", commandLine: commandLine, cpus: 2)
        #expect(off.stop == .guestExit(status: 0), "\(off.text)")
        #expect(on.stop == .guestExit(status: 0), "\(on.text)")
        for key in ["checksum0", "checksum1", "checksum"] {
            let a = resultField(off.text, key), b = resultField(on.text, key)
            #expect(a != nil && a == b, "\(key): \(String(describing: b)) with DMP, \(String(describing: a)) without")
        }
        #expect(on.text == off.text, "the whole output (RESULT line included) is the same")
        // Site k of vCPU c: an LSR read (in al, dx at +0x7) when k + c is even, a port-0x80 write (out dx, al at +0x7,
        // its exits reported past it at +0x8) when odd; the report names both by the instruction's start.
        var order: [String] = []
        for c in 0...1 {
            for k in 0..<12 {
                let location = "smp_site_\(c)_\(k)+0x7"
                let s = try #require(on.report.first { $0.location == location }, "\(location) in \(on.report.map(\.location))")
                #expect(s.state == .patched, "\(s) \(String(describing: s.refusal))")
                #expect(s.site.address == ((k + c) % 2 == 0 ? 0x3fd : 0x80))
                #expect(s.hitsServed > 0, "\(s)")
                #expect(s.userMode)
            }
            order.append(contentsOf: on.report.map(\.location).filter { $0.hasPrefix("smp_site_\(c)_") })
        }
        // Both vCPUs worked at once: the sites became hot interleaved, phase by phase (the guest's barrier
        // guarantees it), not one vCPU's after the other's.
        let hot = on.report.map(\.location).filter { $0.hasPrefix("smp_site_") }
        let phases = hot.map { location in location.dropFirst("smp_site_0_".count).prefix { $0.isNumber } }.compactMap { Int($0) }
        #expect(phases.count == 24 && phases == phases.sorted(), "\(hot)")
        let firstOfOne = try #require(hot.firstIndex { $0.hasPrefix("smp_site_1_") })
        let lastOfZero = try #require(hot.lastIndex { $0.hasPrefix("smp_site_0_") })
        #expect(firstOfOne < lastOfZero, "\(hot)")
        #expect(on.latencies.count >= 24, "\(on.latencies.count) patches applied")
        #expect(on.latencies.allSatisfy { $0.pausedNanoseconds <= $0.hotToPatchedNanoseconds && $0.deferredNanoseconds <= $0.hotToPatchedNanoseconds })
        #expect(order.count == 24)
    }
}

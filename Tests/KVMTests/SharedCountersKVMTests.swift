import DMP
import Synchronization
import Testing
import VMMKit

/// Counts port I/O exits by the RIP they report, on every vCPU (first in the chain; passes every exit on).
final class PortExitsByRIP: @unchecked Sendable {
    private let counts = Mutex<[UInt64: Int]>([:])

    /// The handler to add to the VM's chain.
    var handler: ClosureExitHandler {
        ClosureExitHandler { [self] (exit, context) throws(VMError) -> ExitResult in
            guard case .io = exit, !context.isCompletingAccess, let rip = try? context.registers().rip else { return .pass }
            counts.withLock { $0[rip, default: 0] += 1 }
            return .pass
        }
    }

    /// Exits reported at `rip`.
    func count(at rip: UInt64) -> Int { counts.withLock { $0[rip] ?? 0 } }
}

extension KVMTests {
    @Test("two vCPUs running the same implanted bodies at once (smp-cpl3 shared=1): every call is a hit served in the guest or an exit, none lost")
    func dmpSharedSiteCounts() throws {
        let sites = 4, iters = 50_000
        let exits = PortExitsByRIP()
        let on = try DMPLibraryRun("smp-cpl3", commandLine: "sites=\(sites) iters=\(iters) spin=0 shared=1", cpus: 2,
                                   configure: { c in
                                       c.verify = false          // no undo, so each counter runs the whole time
                                       // lockedCounters left at nil: locked, as the VM has two vCPUs
                                   },
                                   prepare: { vm in vm.addExitHandler(exits.handler) })
        #expect(on.stop == .guestExit(status: 0), "\(on.text)")
        let c0 = resultField(on.text, "checksum0"), c1 = resultField(on.text, "checksum1")
        #expect(c0 != nil && c0 == c1, "both vCPUs made the same calls")
        for k in 0..<sites {
            // Site k of vCPU 0: an LSR read (RIP on the in at +0x7) when k is even, a port-0x80 write (RIP past the out
            // at +0x7) when odd; the report names both by the instruction's start.
            let location = "smp_site_0_\(k)+0x7"
            let s = try #require(on.report.first { $0.location == location }, "\(location) in \(on.report.map(\.location))")
            #expect(s.state == .patched, "\(s)")
            #expect(s.hitCounterDistrust == nil, "\(s)")
            // Each of the 2N calls (N per vCPU) either exited (at the original instruction, or as a fallback from
            // the implanted copy, charged to the site) or was served in the guest and counted once.
            let atOriginal = exits.count(at: s.site.rip)
            let accounted = Int(s.hitsServed) + s.exitsWhilePatched + atOriginal
            #expect(accounted == 2 * iters,
                    "\(location): \(s.hitsServed) hits + \(s.exitsWhilePatched) fallbacks + \(atOriginal) exits at the instruction = \(accounted), the guest made \(2 * iters) calls")
            #expect(s.hitsServed > 0)
        }
    }
}

import DMP
import Testing
import VMMKit

/// An SMP guest written in C (`Guests/c-smp-cpl3`): two vCPUs entered at the same image entry, both at CPL3,
/// printing through one UART under a `lock cmpxchg` spinlock.
extension KVMTests {
    /// `style=0`: the runtime's 8250 driver (slow accessors behind function pointers) run by both vCPUs.
    /// `style=1`: one function holding the lock, the inlined port accesses and `lock add` counters, run by both.
    @Test("DMP on c-smp-cpl3 (two vCPUs, gcc -O2, a spinlocked UART): each vCPU's lines and the checksum identical to DMP off, exit 0, every hot port site served, over 90% of the steady exits gone",
          arguments: ["style=0", "style=1"])
    func dmpSMPCGuest(style: String) throws {
        let commandLine = "iters=200 \(style)"
        let off = try DMPLibraryRun("c-smp-cpl3", commandLine: commandLine, dmp: false, cpus: 2)
        let on = try DMPLibraryRun("c-smp-cpl3", commandLine: commandLine, cpus: 2)
        #expect(off.stop == .guestExit(status: 0), "\(off.text)")
        #expect(on.stop == .guestExit(status: 0), "\(on.text)")
        // How the two vCPUs' lines interleave is the host's scheduling; each vCPU's own lines, in its order, are not.
        for cpu in ["cpu0 ", "cpu1 "] {
            let a = off.lines.filter { $0.hasPrefix(cpu) }, b = on.lines.filter { $0.hasPrefix(cpu) }
            #expect(a.count == 200 && b == a, "\(cpu): \(b.count) lines with DMP, \(a.count) without")
        }
        let sums = off.lines.filter { $0.hasPrefix("sums ") }
        #expect(sums.count == 1 && on.lines.filter { $0.hasPrefix("sums ") } == sums, "\(on.text.suffix(200))")
        let checksum = resultField(off.text, "checksum")
        #expect(checksum != nil && resultField(on.text, "checksum") == checksum)
        let ports = on.report.filter { $0.state == .patched && $0.hitsServed > 0 }.map(\.site.address)
        #expect(Set(ports).isSuperset(of: [0x3f8, 0x3fd]), "\(DMPReport.text(on.report))")
        let offExits = try #require(off.steadyExits), onExits = try #require(on.steadyExits)
        #expect(onExits * 10 < offExits, "steady exits \(onExits) with DMP, \(offExits) without")
    }
}

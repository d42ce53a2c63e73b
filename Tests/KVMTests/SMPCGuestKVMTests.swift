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
        let (off, on) = try smpCGuestRuns("c-smp-cpl3", commandLine: "iters=200 \(style)", iters: 200)
        let sums = off.lines.filter { $0.hasPrefix("sums ") }
        #expect(sums.count == 1 && on.lines.filter { $0.hasPrefix("sums ") } == sums, "\(on.text.suffix(200))")
        let ports = on.report.filter { $0.state == .patched && $0.hitsServed > 0 }.map(\.site.address)
        #expect(Set(ports).isSuperset(of: [0x3f8, 0x3fd]), "\(DMPReport.text(on.report))")
        let offExits = try #require(off.steadyExits), onExits = try #require(on.steadyExits)
        #expect(onExits * 10 < offExits, "steady exits \(onExits) with DMP, \(offExits) without")
    }

    /// c-smp-cpl3-aptables: the AP runs the same code on page tables of its own that leave 14-16 MiB (the implant)
    /// unmapped. A patch planned from the BSP's exits, checked only against the BSP's tables, sent the AP into the
    /// implant, where it took a page fault (`guest exception 14`, exit 0xEE). Every UART site must be refused at the
    /// implant stage (whichever vCPU's exits planned it), the guest left as it is.
    @Test("DMP on c-smp-cpl3-aptables (the AP's own page tables do not map the implant): every UART site refused with the mapping as the reason, exit 0, each vCPU's lines and the checksum identical to DMP off")
    func dmpSMPOtherVCPUTablesWithoutImplant() throws {
        let (_, on) = try smpCGuestRuns("c-smp-cpl3-aptables", commandLine: "iters=120", iters: 120)
        let uart = on.report.filter { [0x3f8, 0x3fd, 0x80].contains($0.site.address) }
        #expect(!uart.isEmpty, "\(DMPReport.text(on.report))")
        for s in uart {
            #expect(s.state == .refused && s.hitsServed == 0, "\(s)")
            #expect(s.refusal?.stage == .implant && s.refusal?.reason.contains("implant") == true, "\(String(describing: s.refusal))")
        }
    }

    /// `image` on two vCPUs without and with DMP. Both must exit 0 with the same checksum, and each vCPU's `iters`
    /// lines must come in the same order (how the two vCPUs' lines interleave is the host's scheduling).
    private func smpCGuestRuns(_ image: String, commandLine: String, iters: Int) throws -> (off: DMPLibraryRun, on: DMPLibraryRun) {
        let off = try DMPLibraryRun(image, commandLine: commandLine, dmp: false, cpus: 2)
        let on = try DMPLibraryRun(image, commandLine: commandLine, cpus: 2)
        #expect(off.stop == .guestExit(status: 0), "\(off.text.suffix(300))")
        #expect(on.stop == .guestExit(status: 0), "\(on.text.suffix(300))")
        for cpu in ["cpu0 ", "cpu1 "] {
            let a = off.lines.filter { $0.hasPrefix(cpu) }, b = on.lines.filter { $0.hasPrefix(cpu) }
            #expect(a.count == iters && b == a, "\(cpu): \(b.count) lines with DMP, \(a.count) without")
        }
        let checksum = resultField(off.text, "checksum")
        #expect(checksum != nil && resultField(on.text, "checksum") == checksum)
        return (off, on)
    }
}

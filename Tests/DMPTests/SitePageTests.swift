import DMP
import Testing
import VMMKit
import VMMKitTesting

/// Issue 6, "Bad input": a site whose code page is not present or not executable when DMP looks at it
/// (another vCPU, or the guest itself without a TLB flush, changed the page tables since the exit).
@Suite("SiteLocator: sites in pages that are not present or not executable at plan time (mock backend)")
struct SitePageTests {
    @Test("refused at the locate stage with the reason", arguments: [false, true])
    func sitePage(executableOnly: Bool) throws {
        let (vm, v, log) = try locatorVM(.pvm, symbols: locatorSymbols, rip: codeBase + 6)
        // The page directory of the first GiB (X86Boot's identity map): entry 0 maps 0-2 MiB, the code included.
        let pde = GuestAddress(X86Layout.pml4 + 0x2000)
        let entry = try vm.memory.read(UInt64.self, at: pde)
        if executableOnly {
            try vm.memory.write(entry | 1 << 63, at: pde)
            var s = try v.specialRegisters()
            s.efer |= 0x800 // NXE
            try v.setSpecialRegisters(s)
        } else {
            try vm.memory.write(entry & ~1, at: pde)
        }
        v.script([.access(.io(portIn), length: 1, destination: .rbx)])
        #expect(try vm.run() == .halted)
        let r = try #require(log.refusals.first, "located: \(log.located)")
        #expect(r.stage == .locate, "\(r)")
        #expect(r.reason.contains(executableOnly ? "does not allow" : "not present"), "\(r)")
        #expect(log.located.isEmpty)
    }
}

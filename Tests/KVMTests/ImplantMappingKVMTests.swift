import DMP
import Testing
import VMMKit
#if canImport(Glibc)
import Synchronization
#endif

// Issue 6, "Bad input": a guest that unmaps or remaps the implant while patched code is live.
// Page-table writes do not exit: DMP walks each patch's implant mapping again on fallback exits,
// on exits at patched sites, whenever a site becomes hot and every 20 ms, and undoes a patch
// whose mapping changed; a re-plan is refused by the mapping check at plan time.

extension KVMTests {
    @Test("a guest that unmaps or remaps the implant under live patches: output and status as without DMP, the patches undone with the reason, none re-made",
          arguments: [3, 4, 5, 6])
    /// `scribble` (Guests/uart-modes-cpl3.s): 3, the implant's code remapped to other frames holding a copy;
    /// 4, unmapped; 5, mapped without execute; 6, mapped supervisor-only.
    func dmpGuestRemapsImplant(scribble: Int) throws {
        let (_, on, stop) = try offAndOn("uart-modes-cpl3", "lines=20 rounds=3 scribble=\(scribble)")
        #expect(stop == .guestExit(status: 0))
        let lines = on.output.split(separator: "\n")
        #expect(lines.last == "done" && lines.count == 3 * (20 + 2) + 1, "\(on.output.suffix(300))")
        let report = DMPReport.text(on.dmp?.report() ?? [])
        let putc = on.sites(in: "uart_putc")
        // Patched in the first round (served in the guest), undone once the mapping changed ...
        #expect(putc.count == 2 && putc.allSatisfy { $0.hotToPatchedNanoseconds != nil && $0.hitsServed > 0 }, "\(report)")
        let undone = on.decisions.reasons("undone")
        #expect(undone.contains { $0.contains("no longer map the implant as when it was patched") }, "\(undone)\n\(report)")
        // ... and never in place again: a re-plan walks the page tables and refuses.
        #expect(!putc.contains { $0.state == .patched }, "\(report)")
        for s in putc where s.state == .refused {
            #expect(s.refusal?.stage == .implant, "\(report)")
        }
    }
}

/// What changes in guest memory between a patch's plan and its write (with the vCPUs paused, undone right after).
enum ChangeAtWrite: String, CaseIterable, Sendable, CustomStringConvertible {
    /// A byte of the function being copied (its `ret`).
    case copiedCode
    /// The 2 MiB page holding the site's code: not present.
    case siteNotPresent
    /// The same page: not executable (the guest set EFER.NXE).
    case siteNotExecutable
    /// The 2 MiB page holding the rings and the implant: not present.
    case implantNotPresent

    var description: String { rawValue }

    /// The reason DMP must give, in part.
    var reason: (stage: DMPRefusal.Stage, text: String) {
        switch self {
        case .copiedCode: (.patch, "uart_putc changed (or was unmapped)")
        case .siteNotPresent: (.patch, "is not the same at the moment of writing")
        case .siteNotExecutable: (.patch, "is not the same at the moment of writing")
        case .implantNotPresent: (.implant, "at the moment of writing, the guest's page tables no longer map the implant")
        }
    }

    /// Makes the change in `vm`'s memory; returns what undoes it.
    func apply(_ vm: VirtualMachine, symbols: SymbolTable) -> @Sendable () -> Void {
        let memory = vm.memory
        func address(_ name: String) -> GuestSymbol? { symbols.symbols.first { $0.name == name } }
        let target: GuestAddress
        let change: (UInt64) -> UInt64
        switch self {
        case .copiedCode:
            guard let f = address("uart_putc") else { return {} }
            let at = GuestAddress(f.address + f.size - 1)
            guard let old = try? memory.read(UInt8.self, at: at) else { return {} }
            try? memory.write(old ^ 0xff, at: at)
            return { try? memory.write(old, at: at) }
        case .siteNotPresent:
            target = GuestAddress(address("pd_tables")?.address ?? 0)
            change = { $0 & ~1 }
        case .siteNotExecutable:
            target = GuestAddress(address("pd_tables")?.address ?? 0)
            change = { $0 | 1 << 63 }
        case .implantNotPresent:
            target = GuestAddress((address("pd_tables")?.address ?? 0) + 7 * 8)
            change = { $0 & ~1 }
        }
        guard let old = try? memory.read(UInt64.self, at: target) else { return {} }
        try? memory.write(change(old), at: target)
        return { try? memory.write(old, at: target) }
    }
}

extension KVMTests {
    @Test("the code, the site's page or the implant's mapping changes between the plan and the write: refused with the reason, output and status as without DMP",
          arguments: ChangeAtWrite.allCases)
    func dmpRefusesWhatChangedAtWrite(_ change: ChangeAtWrite) throws {
        let fired = Atomic<Int>(0)
        let (_, on, stop) = try offAndOn("uart-modes-cpl3", "lines=20 rounds=2 scribble=7") { on in
            let vm = on.vm, symbols = on.loaded.symbols
            on.dmp?.testSeam.patcher.beforeWriteChecks = {
                // Only the first patch (uart_putc's copy) sees the change.
                guard fired.add(1, ordering: .relaxed).newValue == 1 else { return {} }
                return change.apply(vm, symbols: symbols)
            }
        }
        #expect(stop == .guestExit(status: 0))
        #expect(fired.load(ordering: .relaxed) >= 1)
        let report = DMPReport.text(on.dmp?.report() ?? [])
        let putc = on.sites(in: "uart_putc")
        // The plan that met the change (the first hot site's, with its sibling) was refused with the reason; the
        // change was gone for later plans, so the sibling, hot on its own later, may be patched then.
        let refused = putc.filter { $0.state == .refused }
        #expect(refused.count == 1 && refused.allSatisfy { $0.hitsServed == 0 && $0.hotToPatchedNanoseconds == nil }, "\(report)")
        for s in refused {
            #expect(s.refusal?.stage == change.reason.stage && s.refusal?.reason.contains(change.reason.text) == true, "\(report)")
        }
        #expect(on.decisions.reasons("refused").contains { $0.contains(change.reason.text) })
    }
}

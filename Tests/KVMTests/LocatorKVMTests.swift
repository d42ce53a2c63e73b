import DMP
import Synchronization
import Testing
import VMMKit
import X86Disassembler

/// One site the locating handler saw, and what the locator said (first exit of each site and CPL only).
struct LocatedSite: Sendable {
    var site: ExitSite
    var cpl: Int
    var result: Result<LocatedInstruction, DMPRefusal>
}

/// Serves each port I/O or MMIO exit through the rest of the chain, then locates the first exit of every site.
final class LocatingHandler: ExitHandler, @unchecked Sendable {
    private let locator: SiteLocator
    private let seen = Mutex<(keys: Set<String>, sites: [LocatedSite])>(([], []))
    var sites: [LocatedSite] { seen.withLock { $0.sites } }

    init(symbols: SymbolTable) throws { locator = try SiteLocator(symbols: symbols) }

    func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
        switch exit {
        case .io(let io) where io.port != 0xf4: break // not the debug-exit write that ends the run
        case .mmio: break
        default: return .pass
        }
        if context.isCompletingAccess { return .pass }
        let rip = try context.registers().rip
        let cpl = try context.specialRegisters().cpl
        let site = ExitStatistics.site(for: exit, rip: rip)
        let key = "\(site) \(cpl)"
        let first = seen.withLock { $0.keys.insert(key).inserted }
        let r = try context.forward(exit)
        guard first else { return r }
        let result: Result<LocatedInstruction, DMPRefusal>
        do throws(DMPRefusal) { result = .success(try locator.locate(exit, context: context)) } catch { result = .failure(error) }
        seen.withLock { $0.sites.append(LocatedSite(site: site, cpl: cpl, result: result)) }
        return r
    }

    /// The located instructions of the sites matching `filter`; records a failed expectation for every refusal among them.
    func located(_ filter: (LocatedSite) -> Bool) -> [LocatedInstruction] {
        sites.filter(filter).compactMap { s in
            switch s.result {
            case .success(let l): return l
            case .failure(let e):
                Issue.record("\(s.site) at CPL\(s.cpl) refused: \(e)")
                return nil
            }
        }
    }
}

/// The located-address checks against the guest images' symbols (in the serialized KVM suite).
extension KVMTests {
    @Test("uart-cpl3: the locator finds uart_putc's in (RIP on it: bracketed) and out (RIP past: confirmed from the symbol) at CPL3")
    func locateUARTAccesses() throws {
        let symbols = try ELFImage(bytes: try guestImage("uart-cpl3")).symbols
        let putc = try #require(symbols.symbols.first { $0.name == "uart_putc" })
        let handler = try LocatingHandler(symbols: symbols)
        let g = try GuestRun("uart-cpl3", commandLine: "iters=2") { vm in vm.addExitHandler(handler) }
        #expect(try g.run() == .guestExit(status: 0))

        let ins = handler.located { $0.site.kind == .io && $0.site.address == 0x3fd }
        let outs = handler.located { $0.site.kind == .io && $0.site.address == 0x3f8 }
        #expect(Set(ins.map(\.cpl)) == [3], "uart-cpl3 prints only from user mode")
        #expect(Set(outs.map(\.cpl)) == [3])
        for l in ins {
            #expect(l.virtualAddress == putc.address + 5, "in al, dx after the 5-byte mov edx, 0x3fd")
            #expect(l.instruction.description == "in al, dx")
            #expect(l.position == .onInstruction(length: 1))
            #expect(l.confirmation == .bracketed)
        }
        for l in outs {
            #expect(l.virtualAddress == putc.address + 17, "out dx, al, uart_putc's last instruction before ret")
            #expect(l.instruction.description == "out dx, al")
            #expect(l.position == .pastInstruction)
            #expect(l.confirmation == .symbol("uart_putc"))
        }
        for l in ins + outs {
            #expect(l.physicalAddress == GuestAddress(l.virtualAddress), "the guest identity-maps its image")
            #expect(l.paging.mode == .fourLevel)
            #expect(l.addressSpace == l.specialRegisters.cr3 & ExitContext.addressSpaceMask)
        }
        #expect(resultField(g.console.text, "checksum") != nil, "the guest ran to its RESULT line with every access located")

        // The guest's own page tables map the implant identically, user-accessible and executable (USER_LOW).
        let implant = try Implant(area: X86Layout.implantArea)
        let code = try implant.allocateCode(64), data = try implant.allocateData(16)
        for l in ins + outs {
            let p = try implant.placement(for: ImplantSite(l), code: code, data: [data], memory: g.vm.memory)
            #expect(p.kind == .identity)
        }
    }

    @Test("doorbell-cpl3: the locator finds db_batch's MMIO store (RIP past) and load (RIP on) at CPL3, and doorbell_probe's load into its own address register")
    func locateDoorbellAccesses() throws {
        let symbols = try ELFImage(bytes: try guestImage("doorbell-cpl3")).symbols
        let batch = try #require(symbols.symbols.first { $0.name == "db_batch" })
        let probe = try #require(symbols.symbols.first { $0.name == "doorbell_probe" })
        let handler = try LocatingHandler(symbols: symbols)
        let g = try GuestRun("doorbell-cpl3", commandLine: "iters=32") { vm in vm.addExitHandler(handler) }
        #expect(try g.run() == .guestExit(status: 0))

        let doorbell: UInt64 = 0xd000_0000
        let stores = handler.located { $0.site.kind == .mmio && $0.site.address == doorbell + 0x40 && $0.cpl == 3 }
        let status = handler.located { $0.site.kind == .mmio && $0.site.address == doorbell + 0x04 && $0.cpl == 3 }
        let id = handler.located { $0.site.kind == .mmio && $0.site.address == doorbell && $0.cpl == 0 }
        #expect(stores.map(\.virtualAddress) == [batch.address + 13], "mov [rsi + 0x40], eax")
        #expect(stores.first?.position == .pastInstruction)
        #expect(stores.first?.confirmation == .symbol("db_batch"))
        #expect(stores.first?.instruction.description == "mov dword ptr [rsi + 0x40], eax")
        #expect(status.map(\.virtualAddress) == [batch.address + 22], "mov eax, [rsi + 4]")
        #expect(status.first?.position == .onInstruction(length: 3))
        #expect(status.first?.confirmation == .bracketed)
        #expect(id.map(\.virtualAddress) == [probe.address + 5], "mov eax, [rax]: matched with the registers from before the load")
        #expect(id.first?.instruction.description == "mov eax, dword ptr [rax]")
        for l in stores + status + id { #expect(l.physicalAddress == GuestAddress(l.virtualAddress)) }
        #expect(resultField(g.console.text, "checksum") != nil)

        // Identity placement serves the CPL3 sites and the CPL0 one (no SMEP/SMAP in these guests);
        // a CPL3 site is refused an implant page the guest maps supervisor-only (the 2 MiB page at 16 MiB).
        let implant = try Implant(area: X86Layout.implantArea)
        let code = try implant.allocateCode(64), data = try implant.allocateData(16)
        for l in stores + status + id {
            #expect(try implant.placement(for: ImplantSite(l), code: code, data: [data], memory: g.vm.memory).kind == .identity)
        }
        let high = try Implant(area: GuestRange(start: GuestAddress(0x100_0000), size: 0x10_0000))
        let highCode = try high.allocateCode(64)
        if let site = stores.first {
            let r = #expect(throws: DMPRefusal.self) {
                _ = try high.placement(for: ImplantSite(site), code: highCode, data: [], memory: g.vm.memory)
            }
            #expect(r?.reason.contains("does not allow user execute") == true, "\(r?.reason ?? "")")
        }
    }
}

/// The interrupt shadow on real KVM (in the serialized KVM suite).
extension KVMTests {
    @Test("an in right after sti is refused (the vCPU events report the shadow at the exit); the in after it is located")
    func locateInInterruptShadow() throws {
        let code: [UInt8] = [
            0xba, 0x04, 0x07, 0x00, 0x00, // +0  mov edx, 0x704
            0xfb,                         // +5  sti
            0xec,                         // +6  in al, dx        (in sti's shadow)
            0xec,                         // +7  in al, dx        (not)
            0xfa,                         // +8  cli
            0xb0, 0x05, 0xe6, 0xf4,       // +9  mov al, 5; out 0xf4, al
        ]
        let base: UInt64 = 0x10_0000
        for symbols in [SymbolTable(), SymbolTable([GuestSymbol(name: "f", address: base, size: UInt64(code.count), isFunction: true)])] {
            let handler = try LocatingHandler(symbols: symbols)
            let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
            vm.addExitHandler(handler)
            try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
            try vm.bus.attach(Recorder(), ports: 0x704..<0x705)
            _ = try X86Boot.load(.flat(code, loadAddress: base), into: vm)
            #expect(try vm.run() == .guestExit(status: 5))
            let results = handler.sites.map(\.result)
            #expect(results.count == 2)
            // KVM reports the shadow in the vCPU events at the exit (RIP still on the in): refused with or without symbols.
            if case .failure(let r)? = results.first {
                #expect(r.reason == "instruction at 0x100006 in an interrupt shadow (after sti)", "\(r)")
            } else {
                Issue.record("the in after sti was located: \(results.first.map { "\($0)" } ?? "none")")
            }
            if case .success(let l)? = results.last { #expect(l.virtualAddress == base + 7) } else { Issue.record("the second in: \(results.last.map { "\($0)" } ?? "none")") }
        }
    }
}

extension KVMTests {
    @Test("an out right after sti (RIP already past it here) is refused: from the bytes before it, or from a symbol's forward decode")
    func locateOutAfterSti() throws {
        let code: [UInt8] = [
            0xba, 0x04, 0x07, 0x00, 0x00, // +0  mov edx, 0x704
            0xfb,                         // +5  sti
            0xee,                         // +6  out dx, al       (in sti's shadow)
            0xfa,                         // +7  cli
            0xb0, 0x05, 0xe6, 0xf4,       // +8  mov al, 5; out 0xf4, al
        ]
        let base: UInt64 = 0x10_0000
        var reasons: [String] = []
        for symbols in [SymbolTable(), SymbolTable([GuestSymbol(name: "f", address: base, size: UInt64(code.count), isFunction: true)])] {
            let handler = try LocatingHandler(symbols: symbols)
            let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
            vm.addExitHandler(handler)
            try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
            try vm.bus.attach(Recorder(), ports: 0x704..<0x705)
            _ = try X86Boot.load(.flat(code, loadAddress: base), into: vm)
            #expect(try vm.run() == .guestExit(status: 5))
            let r = try #require(handler.sites.first?.result)
            switch r {
            case .success(let l): reasons.append("located \(l.confirmation)")
            case .failure(let e): reasons.append(e.reason)
            }
        }
        // The events no longer show the shadow (the out completed at the exit): without a symbol the
        // bytes before it are enough to refuse, with one the forward decode finds the sti.
        #expect(reasons == ["out dx, al at 0x100006 may follow sti (no symbol to decode from): possibly in an interrupt shadow",
                            "out dx, al at 0x100006 follows sti: in an interrupt shadow"])
    }
}

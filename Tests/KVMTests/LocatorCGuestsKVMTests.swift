import DMP
import Testing
import VMMKit
import X86Disassembler

/// The locator on code nobody shaped for it: the gcc -O2 guests (in the serialized KVM suite).
extension KVMTests {
    @Test("every port I/O and MMIO site of the C guests is located inside its function, at CPL3, confirmed by bracketing or by the symbol; the implant is mapped for each",
          arguments: ["c-uart-cpl3", "c-doorbell-cpl3", "c-selfmod-cpl3"])
    func locateCGuestSites(name: String) throws {
        let symbols = try ELFImage(bytes: try guestImage(name)).symbols
        let handler = try LocatingHandler(symbols: symbols)
        let g = try GuestRun(name, commandLine: "iters=20") { vm in vm.addExitHandler(handler) }
        #expect(try g.run() == .guestExit(status: 0))
        let located = handler.located { _ in true } // records an issue for every refusal
        #expect(located.count == handler.sites.count)
        #expect(located.count >= 6, "UART set-up, LSR reads and THR writes at least")
        let implant = try Implant(area: X86Layout.implantArea)
        let code = try implant.allocateCode(64), data = try implant.allocateData(16)
        for l in located {
            #expect(try implant.placement(for: ImplantSite(l), code: code, data: [data], memory: g.vm.memory).kind == .identity)
            let where_ = symbols.symbolize(l.virtualAddress) ?? "?"
            let f = symbols.symbol(containing: l.virtualAddress)
            #expect(f?.isFunction == true, "\(where_)")
            if let f { #expect(l.endAddress <= f.address + f.size, "\(l.instruction) at \(where_) inside \(f.name)") }
            #expect(l.cpl == 3)
            #expect(l.physicalAddress == GuestAddress(l.virtualAddress))
            switch l.access.target {
            case .port:
                #expect(l.instruction.mnemonic == (l.access.direction == .read ? "in" : "out"), "\(l.instruction) at \(where_)")
            case .memory:
                #expect(l.instruction.mnemonic == "mov", "\(l.instruction) at \(where_)")
            }
            switch l.position {
            case .onInstruction: #expect(l.confirmation == .bracketed)
            default: #expect(l.confirmation == .symbol(f?.name ?? ""), "\(l.instruction) at \(where_)")
            }
        }
    }
}

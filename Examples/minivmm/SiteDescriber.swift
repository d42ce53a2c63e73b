import Synchronization
import VMMKit
import X86Disassembler

/// Keeps the registers of the first exit at each (RIP, access) site, so the
/// profile can match the exit to its instruction by operands (port from DX,
/// effective address from the base and index registers). Only installed with
/// `--profile`; special registers are read (one ioctl) only on a site's first exit.
final class ExitSnapshots: ExitHandler, Sendable {
    /// A site: where RIP was and what the exit accessed.
    struct Key: Hashable {
        var rip: UInt64
        var access: X86ExitAccess
    }

    /// The state at a site's first exit.
    struct Snapshot {
        var registers: Registers
        var specialRegisters: SpecialRegisters?
    }

    /// At most this many sites keep a snapshot (memory stays bounded whatever the guest does).
    static let limit = 4096
    private let store = Mutex<[Key: Snapshot]>([:])

    func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
        let access: X86ExitAccess
        switch exit {
        case .io(let io): access = X86ExitAccess(io)
        case .mmio(let m): access = X86ExitAccess(m)
        default: return .pass
        }
        guard let regs = try? context.registers() else { return .pass }
        let key = Key(rip: regs.rip, access: access)
        let known = store.withLock { $0[key] != nil || $0.count >= ExitSnapshots.limit }
        if !known {
            let sregs = try? context.specialRegisters()
            store.withLock { if $0[key] == nil { $0[key] = Snapshot(registers: regs, specialRegisters: sregs) } }
        }
        return .pass
    }

    /// The snapshot of a site, if one was kept.
    func snapshot(rip: UInt64, access: X86ExitAccess) -> Snapshot? {
        store.withLock { $0[Key(rip: rip, access: access)] }
    }
}

/// Finds the exiting instruction of a site by its operands: KVM may report RIP
/// on the instruction (IN and MMIO loads) or just past it (OUT, MMIO stores on
/// hardware), so the instructions ending at RIP and the one starting there are
/// decoded through the page walk, and the one whose port (imm8 or DX) or
/// effective address, width and direction reproduce the exit wins.
///
/// Several decodings can end at RIP and reproduce the exit (`41 EE` and `EE`
/// are both `out dx, al`); a forward decode from the enclosing symbol's start
/// then says which one ran.
struct SiteDescriber {
    let vm: VirtualMachine
    let snapshots: ExitSnapshots?
    let symbols: SymbolTable
    let disassembler: X86Disassembler?

    init(vm: VirtualMachine, snapshots: ExitSnapshots?, symbols: SymbolTable) {
        self.vm = vm
        self.snapshots = snapshots
        self.symbols = symbols
        disassembler = try? X86Disassembler(mode: .bits64)
    }

    func instruction(for site: ExitSite) -> String? {
        let access: X86ExitAccess
        switch site.kind {
        case .io: access = X86ExitAccess(.port(UInt16(truncatingIfNeeded: site.address)), width: Int(site.size), direction: site.direction)
        case .mmio: access = X86ExitAccess(.memory(GuestAddress(site.address)), width: Int(site.size), direction: site.direction)
        default: return nil
        }
        guard let d = disassembler, let snap = snapshots?.snapshot(rip: site.rip, access: access) else { return nil }
        guard let sregs = snap.specialRegisters ?? (try? vm.vcpus[0].specialRegisters()) else { return nil }
        let context: X86CodeContext
        do { context = try X86CodeContext(memory: vm.memory, specialRegisters: sregs) } catch { return "(\(error))" }
        var (ending, starting) = d.candidates(reproducing: access, rip: site.rip, registers: snap.registers, context: context)
        if ending.count > 1, site.rip > 0, let function = symbols.symbol(containing: site.rip - 1),
           let confirmed = d.instruction(endingAt: site.rip, decodingFrom: function.address, in: context) {
            ending = ending.filter { $0.address == confirmed.address }
        }
        var found = ending.map(\.description) + (starting.map { [$0.description + " (at rip)"] } ?? [])
        guard !found.isEmpty else { return nil }
        if found.count > 1 { found[0] += " (+\(found.count - 1) more)" }
        return found[0]
    }
}

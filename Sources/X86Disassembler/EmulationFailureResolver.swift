import VMMKit
#if canImport(Glibc)
import Glibc
#endif

/// Resolves the guest-physical bytes an instruction KVM could not emulate
/// writes (see ``VirtualMachine/setEmulationFailureResolver(_:)``): decodes it
/// (KVM's instruction bytes, else the code at RIP through the page walk),
/// computes each written memory operand's linear address from the vCPU's
/// registers and segment bases, and translates it page by page for a write.
///
/// One decoder behind a lock: vCPUs resolving at once take turns (emulation
/// failures are rare and each costs an exit of milliseconds on some hosts).
public final class X86EmulationFailureResolver: EmulationFailureResolver, @unchecked Sendable {
    private let disassembler: X86Disassembler
    private var mutex = pthread_mutex_t()

    /// Opens the decoder.
    public init() throws(X86DecodeError) {
        disassembler = try X86Disassembler()
        pthread_mutex_init(&mutex, nil)
    }

    deinit { pthread_mutex_destroy(&mutex) }

    /// The ranges (one per page) the failing instruction writes; empty when it
    /// writes no memory; `nil` when the instruction, a register or a page
    /// cannot be resolved, and for stores whose size the decoder cannot tell
    /// (the XSAVE family: XCR0 sets it) or that name no memory operand (`maskmovdqu`).
    public func writes(of failure: GuardedEmulationFailure, context: ExitContext) -> [GuestRange]? {
        guard let sregs = try? context.specialRegisters(), let regs = try? context.registers(),
              let code = try? X86CodeContext(memory: context.memory, specialRegisters: sregs) else { return nil }
        let bytes = failure.instructionBytes.isEmpty ? code.readCode(at: failure.rip, count: 15).bytes : failure.instructionBytes
        pthread_mutex_lock(&mutex)
        let decoded = try? disassembler.decode(bytes, address: failure.rip, mode: code.mode)
        pthread_mutex_unlock(&mutex)
        guard let insn = decoded else { return nil }
        // maskmovq / maskmovdqu / vmaskmovdqu store to [rdi] through no operand Capstone names.
        if insn.encoding.opcode == 0xf7, insn.encoding.map == .map0F || insn.encoding.map == .vex(1) { return nil }
        let access: PageAccess = sregs.cpl == 3 ? [.write, .user] : [.write]
        var out: [GuestRange] = []
        for op in insn.memoryOperands where op.access.contains(.write) {
            guard let m = op.memory, op.size > 0, op.size <= 512,
                  let linear = insn.effectiveAddress(of: m, registers: regs, segments: code.segments) else { return nil }
            var done = 0
            while done < op.size {
                let va = linear &+ UInt64(done)
                let chunk = min(op.size - done, Int(4096 - (va & 0xfff)))
                guard let pa = try? code.translate(va, access: access) else { return nil }
                out.append(GuestRange(start: pa, size: UInt64(chunk)))
                done += chunk
            }
        }
        return out
    }
}

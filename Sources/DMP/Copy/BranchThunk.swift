import VMMKit
import X86Disassembler

/// The thunks code built with retpolines routes its branches through (gcc `-mindirect-branch=thunk*`,
/// `-mfunction-return=thunk*`; Linux's `arch/x86/lib/retpoline.S`), recognised by what their code does, never
/// by their names: a kernel may give them any name, and a function named `__x86_return_thunk` may do anything.
///
/// Every indirect `call`/`jmp` of such code is a direct `call`/`jmp` of a *register thunk* that jumps to the
/// register's value, and every `ret` a `jmp` to a *return thunk*. DMP treats them as what they stand for: a
/// function that ends in a jump to a return thunk returns (``FunctionCopyPlan/make(hot:in:at:disassembler:usedPadding:allowNoEntry:entryThroughPadding:promotions:accessors:)``),
/// and a call of a register thunk is an indirect call through that register (``CallPromotion``).
package enum BranchThunk {
    /// The register a *register thunk* jumps through, or `nil` when `function` is none: after an optional
    /// `endbr64`, `jmp r64`, `lfence; jmp r64`, or the retpoline `call L; <anything>; L: mov [rsp], r64; ret`
    /// (the call pushes a return address the `mov` replaces with the register, which the `ret` jumps to with RSP
    /// back where it was; what lies between the call and `L` is a speculation trap that never runs). In each
    /// form the thunk leaves every register, RSP and the flags as they were and continues at the register's
    /// value, as `jmp r64` does.
    package static func register(of function: DecodedFunction) -> X86Register? {
        registerThunk(at: function.start) { a in function.index(at: a).map { function.instructions[$0] } }?.register
    }

    /// Whether `function` is a *return thunk*: after an optional `endbr64`, a plain `ret`, or the retpoline
    /// `call L; <anything>; L: lea rsp, [rsp + 8]; ret` (the pushed address dropped, then a return to the
    /// caller's return address; `lea` writes no flag). A `jmp` to it is a `ret`.
    package static func isReturn(_ function: DecodedFunction) -> Bool {
        returnThunk(at: function.start) { a in function.index(at: a).map { function.instructions[$0] } } != nil
    }

    /// The register thunk `jump` (a direct `jmp rel32` or `call rel32`) reaches: its register and the bytes it runs
    /// (from its start to the end of its last instruction, which a patch checks and guards); `nil` when the code at
    /// the target is none. The thunk is read at the target, instruction by instruction from there, whether a sized
    /// symbol bounds it or not (gcc's `-mindirect-branch=thunk` emits its thunks without a size).
    package static func registerThunk(reachedBy jump: X86Instruction, in image: CodeImage,
                                      disassembler: X86Disassembler) -> (register: X86Register, thunk: CodeImage.Region)? {
        guard jump.encoding.map == .primary, jump.encoding.opcode == 0xe8 || jump.encoding.opcode == 0xe9, jump.length == 5,
              let b = jump.branch else { return nil }
        return registerThunk(at: b.target) { image.instruction(at: $0, disassembler: disassembler) }
            .flatMap { t in image.bytes(at: b.target, count: Int(t.end &- b.target)).map { (t.register, CodeImage.Region(address: b.target, bytes: $0)) } }
    }

    /// Whether the direct `jmp` `jump` goes to a return thunk (a `ret` in retpoline code), read at its target as
    /// ``registerThunk(reachedBy:in:disassembler:)`` reads a register thunk.
    package static func isReturnJump(_ jump: X86Instruction, in image: CodeImage, disassembler: X86Disassembler) -> Bool {
        guard jump.encoding.map == .primary, jump.encoding.opcode == 0xe9 || jump.encoding.opcode == 0xeb, let b = jump.branch else {
            return false
        }
        return returnThunk(at: b.target) { image.instruction(at: $0, disassembler: disassembler) } != nil
    }

    /// The largest distance from a retpoline's `call` to its label (the speculation trap and its padding).
    static let maximumTrap: UInt64 = 64

    /// A register thunk at `start` with the instructions `at` gives: its register and the end of its last instruction.
    private static func registerThunk(at start: UInt64, _ at: (UInt64) -> X86Instruction?) -> (register: X86Register, end: UInt64)? {
        guard var first = at(start) else { return nil }
        if first.bytes == [0xf3, 0x0f, 0x1e, 0xfa] { guard let next = at(first.nextAddress) else { return nil }; first = next }
        if let r = registerJump(first) { return (r, first.nextAddress) }
        if first.mnemonic == "lfence", first.operands.isEmpty, let j = at(first.nextAddress), let r = registerJump(j) { return (r, j.nextAddress) }
        guard let label = calledLabel(first), let mov = at(label), let ret = at(mov.nextAddress) else { return nil }
        guard mov.mnemonic == "mov", mov.operands.count == 2, mov.operands[0].size == 8,
              let m = mov.operands[0].memory, m.base == .rsp, m.index == nil, m.displacement == 0, m.segment == nil,
              case .register(let r) = mov.operands[1].operand, let g = r.generalPurpose, g.width == 8, r != .rsp,
              isPlainReturn(ret) else { return nil }
        return (r, ret.nextAddress)
    }

    /// A return thunk at `start` with the instructions `at` gives: the end of its last instruction.
    private static func returnThunk(at start: UInt64, _ at: (UInt64) -> X86Instruction?) -> UInt64? {
        guard var first = at(start) else { return nil }
        if first.bytes == [0xf3, 0x0f, 0x1e, 0xfa] { guard let next = at(first.nextAddress) else { return nil }; first = next }
        if isPlainReturn(first) { return first.nextAddress }
        guard let label = calledLabel(first), let lea = at(label), let ret = at(lea.nextAddress) else { return nil }
        guard lea.mnemonic == "lea", lea.operands.count == 2, case .register(.rsp) = lea.operands[0].operand,
              let m = lea.operands[1].memory, m.base == .rsp, m.index == nil, m.displacement == 8, m.segment == nil,
              isPlainReturn(ret) else { return nil }
        return ret.nextAddress
    }

    /// `jmp r64` (FF /4 with a 64-bit register other than RSP): its register.
    private static func registerJump(_ i: X86Instruction) -> X86Register? {
        guard CallPromotion.isIndirectJump(i), i.operands.count == 1, case .register(let r) = i.operands[0].operand,
              let g = r.generalPurpose, g.width == 8, r != .rsp, !i.encoding.hasOperandSizePrefix, !i.encoding.hasRepne else { return nil }
        return r
    }

    /// A `ret` with no immediate and no prefix (`66` or `bnd` change what it pops or how).
    private static func isPlainReturn(_ i: X86Instruction) -> Bool {
        i.bytes == [0xc3]
    }

    /// For `call rel32` to a label at most ``maximumTrap`` bytes further on: the label.
    private static func calledLabel(_ call: X86Instruction) -> UInt64? {
        guard call.encoding.map == .primary, call.encoding.opcode == 0xe8, call.length == 5, let b = call.branch,
              b.target >= call.nextAddress, b.target &- call.nextAddress <= maximumTrap else { return nil }
        return b.target
    }
}

extension CodeImage {
    /// The instruction that starts at `address`, decoded from the image's code (in 64-bit mode), or `nil`.
    package func instruction(at address: UInt64, disassembler: X86Disassembler) -> X86Instruction? {
        guard let r = regions.first(where: { address >= $0.address && address &- $0.address < UInt64($0.bytes.count) }) else { return nil }
        let offset = Int(address &- r.address)
        return try? disassembler.decode(Array(r.bytes[offset..<min(offset + 15, r.bytes.count)]), address: address, mode: .bits64)
    }
}

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
        let body = strippingEndbr(function.instructions)
        guard let first = body.first else { return nil }
        if let r = registerJump(first) { return r }
        if first.mnemonic == "lfence", first.operands.isEmpty, body.count > 1, let r = registerJump(body[1]) { return r }
        guard let (k, _) = calledLabel(body, function: function), k + 1 < body.count else { return nil }
        let mov = body[k], ret = body[k + 1]
        guard mov.mnemonic == "mov", mov.operands.count == 2, mov.operands[0].size == 8,
              let m = mov.operands[0].memory, m.base == .rsp, m.index == nil, m.displacement == 0, m.segment == nil,
              case .register(let r) = mov.operands[1].operand, let g = r.generalPurpose, g.width == 8, r != .rsp,
              isPlainReturn(ret) else { return nil }
        return r
    }

    /// Whether `function` is a *return thunk*: after an optional `endbr64`, a plain `ret`, or the retpoline
    /// `call L; <anything>; L: lea rsp, [rsp + 8]; ret` (the pushed address dropped, then a return to the
    /// caller's return address; `lea` writes no flag). A `jmp` to it is a `ret`.
    package static func isReturn(_ function: DecodedFunction) -> Bool {
        let body = strippingEndbr(function.instructions)
        guard let first = body.first else { return false }
        if isPlainReturn(first) { return true }
        guard let (k, _) = calledLabel(body, function: function), k + 1 < body.count else { return false }
        let lea = body[k]
        guard lea.mnemonic == "lea", lea.operands.count == 2, case .register(.rsp) = lea.operands[0].operand,
              let m = lea.operands[1].memory, m.base == .rsp, m.index == nil, m.displacement == 8, m.segment == nil else { return false }
        return isPlainReturn(body[k + 1])
    }

    /// The register thunk `jump` (a direct `jmp rel32` or `call rel32`) reaches, as the function starting at
    /// its target, with that function; `nil` when the target starts no sized function or that function is none.
    package static func registerThunk(reachedBy jump: X86Instruction, in image: CodeImage,
                                      disassembler: X86Disassembler) -> (register: X86Register, thunk: DecodedFunction)? {
        guard jump.encoding.map == .primary, jump.encoding.opcode == 0xe8 || jump.encoding.opcode == 0xe9, jump.length == 5,
              let b = jump.branch, let symbol = image.function(containing: b.target), symbol.address == b.target,
              let thunk = try? image.decode(symbol, disassembler: disassembler), let r = register(of: thunk) else { return nil }
        return (r, thunk)
    }

    /// Whether the direct `jmp` `jump` goes to a return thunk (a `ret` in retpoline code).
    package static func isReturnJump(_ jump: X86Instruction, in image: CodeImage, disassembler: X86Disassembler) -> Bool {
        guard jump.encoding.map == .primary, jump.encoding.opcode == 0xe9 || jump.encoding.opcode == 0xeb,
              let b = jump.branch, let symbol = image.function(containing: b.target), symbol.address == b.target,
              let f = try? image.decode(symbol, disassembler: disassembler) else { return false }
        return isReturn(f)
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

    /// For a body starting with `call rel32` to an instruction of the same function further on: that instruction's
    /// index in `body` and its address.
    private static func calledLabel(_ body: [X86Instruction], function: DecodedFunction) -> (Int, UInt64)? {
        guard let call = body.first, call.encoding.map == .primary, call.encoding.opcode == 0xe8, call.length == 5,
              let b = call.branch, b.target > call.address, function.contains(b.target),
              let k = body.firstIndex(where: { $0.address == b.target }) else { return nil }
        return (k, b.target)
    }

    /// The instructions after an optional first `endbr64`.
    private static func strippingEndbr(_ instructions: [X86Instruction]) -> [X86Instruction] {
        instructions.first?.bytes == [0xf3, 0x0f, 0x1e, 0xfa] ? Array(instructions.dropFirst()) : instructions
    }
}

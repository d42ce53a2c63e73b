import X86Disassembler

extension X86Assembler {
    /// Emits one decoded instruction at the current position with its relative
    /// operands refitted (DESIGN.md, DMP step 4):
    ///
    /// - a RIP-relative memory operand keeps its absolute target: the displacement is
    ///   rewritten in the field ``X86Encoding/displacement`` names (VMMKit's tables,
    ///   not Capstone's, which misreports some sizes);
    /// - `jmp rel8/rel32` becomes `jmp rel32`, `jcc rel8/rel32` becomes `jcc rel32`
    ///   (branch hints, `2e`/`3e`, and a REX prefix are dropped), `call rel32` stays `call rel32`;
    /// - `jrcxz`/`jecxz`, `loop`, `loope` and `loopne` keep their own short form
    ///   (with their prefixes, so `67` still selects `ecx`) over a two-instruction
    ///   ladder, `op +2; jmp short +5; jmp rel32 target`, which changes no flag;
    /// - everything else is copied as it is.
    ///
    /// - Parameter branchTarget: where a relative branch goes instead of its decoded
    ///   target (a label inside a function copy); `nil` keeps the decoded target.
    /// - Throws: ``DMPRefusal`` (``DMPRefusal/Stage/encode``) for code that is not
    ///   64-bit, `66`- or `bnd`-prefixed branches, `xbegin`, and any target or
    ///   RIP-relative address beyond ±2 GiB of its new place.
    ///
    /// On a refusal nothing is emitted.
    package mutating func relocate(_ instruction: X86Instruction, branchTarget: Target? = nil) throws(DMPRefusal) {
        var copy = self
        try copy.emitRelocated(instruction, branchTarget: branchTarget)
        self = copy
    }

    private mutating func emitRelocated(_ i: X86Instruction, branchTarget: Target?) throws(DMPRefusal) {
        let e = i.encoding
        guard e.mode == .bits64 else { throw DMPRefusal(.encode, "\(i): only 64-bit code is relocated") }
        guard i.bytes.count == i.length, e.length == i.length else {
            throw DMPRefusal(.encode, "\(i): its bytes and its length disagree")
        }
        if e.isRelativeBranch || i.branch != nil {
            guard let b = i.branch else { throw DMPRefusal(.encode, "\(i): a relative branch without a target") }
            if i.groups.contains(.transactional) { throw DMPRefusal(.encode, "\(i): xbegin is not relocated (its abort path is relative)") }
            if e.hasOperandSizePrefix { throw DMPRefusal(.encode, "\(i): 66-prefixed branch (its offset size depends on the vendor)") }
            if e.hasRepne { throw DMPRefusal(.encode, "\(i): bnd-prefixed branch") }
            let target = branchTarget ?? .absolute(b.target)
            switch (e.map, e.opcode) {
            case (.primary, 0xeb), (.primary, 0xe9): try jmp(target)
            case (.primary, 0xe8): try call(target)
            case (.primary, 0x70...0x7f), (.map0F, 0x80...0x8f):
                guard let c = Condition(rawValue: e.opcode & 0x0f) else { throw DMPRefusal(.encode, "\(i): no condition") }
                try jcc(c, target)
            case (.primary, 0xe0...0xe3):
                // loop/loope/loopne/jrcxz have no rel32 form: keep the short one over a ladder.
                raw(Array(i.bytes[..<b.field.offset]) + [0x02]) // op +2 -> the jmp rel32 below
                raw([0xeb, 0x05])                               // not taken: over it
                try jmp(target)
            default:
                throw DMPRefusal(.encode, "\(i): a relative branch DMP does not relocate")
            }
            return
        }
        if e.isRIPRelative {
            guard let f = e.displacement, f.size == 4, let disp = f.signedValue(in: i.bytes) else {
                throw DMPRefusal(.encode, "\(i): a RIP-relative operand without a 32-bit displacement field")
            }
            let target = i.nextAddress &+ UInt64(bitPattern: disp)
            let next = position &+ UInt64(i.length)
            guard let d = X86Assembler.rel32(to: target, from: next) else {
                throw DMPRefusal(.encode, "\(i): its operand 0x\(String(target, radix: 16)) is beyond ±2 GiB of 0x\(String(next, radix: 16))")
            }
            var moved = i.bytes
            X86Assembler.put(d, into: &moved, at: f.offset)
            raw(moved)
            return
        }
        raw(i.bytes)
    }
}

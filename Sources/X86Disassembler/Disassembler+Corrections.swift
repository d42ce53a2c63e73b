import CCapstone

// What Capstone 4 reports wrongly or leaves out, corrected from the opcode (the numbered mistakes in
// ``X86Disassembler``'s documentation): flags, implicit registers, relative branches, groups, memory access and size.
extension X86Disassembler {
    /// Capstone's `X86_EFLAGS_*` bits as read, written and undefined sets. `PRIOR_*`
    /// (the flag may keep its old value) counts as read: the old value can show through.
    static func flags(_ f: UInt64) -> (read: X86Flags, written: X86Flags, undefined: X86Flags) {
        // Bit positions per flag in Capstone 4's encoding (MODIFY, PRIOR, RESET, SET, TEST, UNDEFINED).
        let table: [(X86Flags, modify: Int, prior: Int, reset: Int, set: Int, test: Int, undefined: Int)] = [
            (.auxiliaryCarry, 0, 14, 26, 55, 50, 44), (.carry, 1, 16, 22, 30, 37, 45), (.sign, 2, 12, 25, 53, 34, 41),
            (.zero, 3, 13, 51, 54, 35, 42), (.parity, 4, 15, 29, 56, 36, 43), (.overflow, 5, 11, 21, 52, 33, 40),
            (.trap, 6, 17, 27, -1, 49, -1), (.interrupt, 7, 18, 24, 32, 48, -1), (.direction, 8, 19, 23, 31, 39, -1),
            (.nestedTask, 9, 20, 28, -1, 38, -1), (.resume, 10, -1, 46, -1, 47, -1),
            // RESET_0F (bit 57) is Capstone's spelling of a second RESET_OF; RESET_AC is bit 58.
            (.overflow, -1, -1, 57, -1, -1, -1), (.alignmentCheck, -1, -1, 58, -1, -1, -1),
        ]
        func has(_ bit: Int) -> Bool { bit >= 0 && f & (1 << UInt64(bit)) != 0 }
        var r: X86Flags = [], w: X86Flags = [], u: X86Flags = []
        for t in table {
            if has(t.test) || has(t.prior) { r.insert(t.0) }
            if has(t.modify) || has(t.reset) || has(t.set) || has(t.undefined) { w.insert(t.0) }
            if has(t.undefined) { u.insert(t.0) }
        }
        return (r, w, u)
    }

    /// Flags an instruction reads that Capstone 4.0.2 does not report (mistake 6): the carry of
    /// `adc`/`sbb`/`rcl`/`rcr`/`cmc`/`adcx`, the overflow of `adox`, every flag for `pushf` and the
    /// low ones for `lahf`, ZF for `loope`/`loopne`, and the arithmetic flags for shifts and rotates
    /// whose count may be 0 (by CL, or an immediate 0), which leave the flags unchanged.
    static func missingFlagsRead(_ e: X86Encoding, bytes: [UInt8]) -> X86Flags {
        let op = e.opcode, reg = (e.modRM >> 3) & 7
        switch e.map {
        case .primary:
            switch op {
            case 0x10...0x15, 0x18...0x1d: return .carry
            case 0x80...0x83 where reg == 2 || reg == 3: return .carry
            case 0xf5: return .carry
            case 0x9c: return [.arithmetic, .trap, .interrupt, .direction, .nestedTask, .alignmentCheck]
            case 0x9f: return [.sign, .zero, .auxiliaryCarry, .parity, .carry]
            case 0xe0, 0xe1: return .zero
            case 0xd0...0xd3, 0xc0, 0xc1:
                var f: X86Flags = reg == 2 || reg == 3 ? .carry : []
                let countMayBeZero: Bool
                switch op {
                case 0xd2, 0xd3: countMayBeZero = true
                case 0xc0, 0xc1:
                    guard let imm = e.immediate, imm.offset < bytes.count else { return f }
                    countMayBeZero = bytes[imm.offset] & (e.operandSize == 64 ? 0x3f : 0x1f) == 0
                default: countMayBeZero = false
                }
                if countMayBeZero { f.formUnion(.arithmetic) }
                return f
            default: return []
            }
        case .map0F38 where op == 0xf6:
            return e.hasOperandSizePrefix ? .carry : e.hasRep ? .overflow : []
        default:
            return []
        }
    }

    /// Implicit registers Capstone 4.0.2 leaves out of `cs_regs_access` (mistake 10): the
    /// accumulator `cmpxchg` writes, the RCX and R11 `syscall` writes (and `sysret` reads),
    /// `xlat`'s RBX and AL, and the RSP and RBP `enter` reads and writes.
    static func missingRegisters(_ e: X86Encoding) -> (read: [X86Register], written: [X86Register]) {
        let accumulator: X86Register = e.operandSize == 64 ? .rax : e.operandSize == 16 ? .ax : .eax
        switch (e.map, e.opcode) {
        case (.map0F, 0xb0): return ([.al], [.al])
        case (.map0F, 0xb1): return ([accumulator], [accumulator])
        case (.map0F, 0x05): return ([], [.rcx, .r11])
        case (.map0F, 0x07): return ([.rcx, .r11], [])
        case (.primary, 0xd7):
            let base: X86Register = e.addressSize == 64 ? .rbx : e.addressSize == 32 ? .ebx : .bx
            return ([base, .al], [.al])
        case (.primary, 0xc8):
            let (sp, bp): (X86Register, X86Register) = e.mode == .bits64 ? (.rsp, .rbp) : e.operandSize == 16 ? (.sp, .bp) : (.esp, .ebp)
            return ([sp, bp], [sp, bp])
        default: return ([], [])
        }
    }

    /// The target and offset field of a relative branch.
    static func relativeBranch(_ e: X86Encoding, bytes: [UInt8], address: UInt64) -> X86RelativeBranch? {
        guard e.isRelativeBranch, let f = e.immediate, let offset = f.signedValue(in: bytes) else { return nil }
        var target = address &+ UInt64(e.length) &+ UInt64(bitPattern: offset)
        // Outside 64-bit mode the instruction pointer wraps at the operand size.
        if e.mode != .bits64 { target &= e.operandSize == 16 ? 0xffff : 0xffff_ffff }
        return X86RelativeBranch(target: target, offset: offset, field: f)
    }

    /// Groups from the opcode (and Capstone's privilege group).
    static func groups(_ e: X86Encoding, operands: [DecodedOperand], capstoneGroups: [UInt8]) -> X86InstructionGroups {
        var g: X86InstructionGroups = []
        let op = e.opcode, reg = (e.modRM >> 3) & 7, hasModRM = e.modRMOffset != nil
        let mem = hasModRM && e.modRM >> 6 != 3
        if capstoneGroups.contains(UInt8(X86_GRP_PRIVILEGE.rawValue)) { g.insert(.privileged) }
        if e.isRelativeBranch { g.insert(.relativeBranch) }
        if e.hasLock { g.insert(.locked) }
        if e.vectorPrefix != nil { g.insert(.vectorEncoded) }
        switch e.map {
        case .primary:
            switch op {
            case 0x70...0x7f, 0xe0...0xe3: g.formUnion([.jump, .conditionalBranch])
            case 0xe9, 0xeb: g.insert(.jump)
            case 0xea: g.formUnion([.jump, .farBranch])
            case 0xe8: g.insert(.call)
            case 0x9a: g.formUnion([.call, .farBranch])
            case 0xc2, 0xc3: g.insert(.return)
            case 0xca, 0xcb: g.formUnion([.return, .farBranch])
            case 0xcc, 0xcd, 0xce, 0xf1: g.insert(.interrupt)
            case 0xcf: g.formUnion([.interruptReturn, .farBranch, .privileged])
            case 0xf4: g.formUnion([.halt, .privileged])
            case 0xe4...0xe7, 0xec...0xef: g.insert(.portIO)
            case 0x6c...0x6f: g.formUnion([.portIO, .string])
            case 0xa4...0xa7, 0xaa...0xaf: g.insert(.string)
            case 0xc6 where e.modRM == 0xf8: g.insert(.transactional)
            case 0xc7 where e.modRM == 0xf8: g.formUnion([.transactional, .jump])
            case 0xff:
                switch reg {
                case 2: g.formUnion([.call, .indirectBranch])
                case 3: g.formUnion([.call, .indirectBranch, .farBranch])
                case 4: g.formUnion([.jump, .indirectBranch])
                case 5: g.formUnion([.jump, .indirectBranch, .farBranch])
                default: break
                }
            default: break
            }
        case .map0F:
            switch op {
            case 0x80...0x8f: g.formUnion([.jump, .conditionalBranch])
            case 0x05, 0x34: g.insert(.interrupt)
            case 0x07, 0x35: g.formUnion([.interruptReturn, .privileged])
            case 0x0b, 0xb9, 0xff: g.insert(.undefined)
            case 0x01 where [0xd5, 0xd6].contains(e.modRM): g.insert(.transactional)
            default: break
            }
        default: break
        }
        if g.contains(.string) && (e.hasRep || e.hasRepne) { g.insert(.repeated) }
        // lea (8D), the hint NOPs and prefetches (0F 18–1F, 0F 0D) name memory without accessing it.
        let noAccess = (e.map == .primary && op == 0x8d) || (e.map == .map0F && (op == 0x0d || (0x18...0x1f).contains(op)))
        if !noAccess && (mem || operands.contains { $0.memory != nil && !$0.access.isEmpty }) { g.insert(.memoryAccess) }
        return g
    }

    /// The access of an instruction's memory operand where Capstone 4.0.2 gets it wrong (mistake 4);
    /// `nil` to keep Capstone's.
    static func correctedMemoryAccess(_ e: X86Encoding) -> OperandAccess? {
        let op = e.opcode, reg = (e.modRM >> 3) & 7
        let rw: OperandAccess = [.read, .write]
        // The mandatory prefix: 66/F3/F2 for legacy SSE, VEX/EVEX pp otherwise.
        var pp: UInt8 = e.hasOperandSizePrefix ? 1 : e.hasRep ? 2 : e.hasRepne ? 3 : 0
        if e.vectorPrefix != nil { pp = e.vexPP }
        switch e.map {
        case .primary:
            switch op {
            case 0x6c, 0x6d: return .write
            case 0x6e, 0x6f: return .read
            case 0xf6 where reg < 2, 0xf7 where reg < 2: return .read
            case 0xd9: return [2, 3, 6, 7].contains(reg) ? .write : .read
            case 0xdb: return [1, 2, 3, 7].contains(reg) ? .write : .read
            case 0xdd: return [1, 2, 3, 6, 7].contains(reg) ? .write : .read
            case 0xdf: return [1, 2, 3, 6, 7].contains(reg) ? .write : .read
            case 0xd8, 0xda, 0xdc, 0xde: return .read
            default: return nil
            }
        case .map0F, .vex(1), .evex(1):
            switch op {
            case 0x90...0x9f where e.map == .map0F: return .write // setcc (Capstone: read for all but sete/setne)
            case 0x91 where e.map == .vex(1): return .write // kmov m, k
            case 0xb0 where e.map == .map0F, 0xb1 where e.map == .map0F: return rw
            case 0xc7 where e.map == .map0F && reg == 1: return rw
            case 0xc3 where e.map == .map0F: return .write
            case 0x11, 0x13, 0x17, 0x29, 0x2b, 0x7f, 0xe7: return .write
            case 0xd6 where pp == 1: return .write
            case 0x7e: return pp == 2 ? .read : .write
            case 0xae where e.map == .map0F || reg == 2 || reg == 3:
                switch reg {
                case 0, 3, 4, 6: return .write
                case 1, 2, 5: return .read
                default: return nil
                }
            default: return nil
            }
        case .map0F38:
            // movbe m, r; with F2 the opcode is crc32, which reads.
            return op == 0xf1 && !e.hasRepne ? .write : nil
        case .vex(2):
            return [0x2e, 0x2f, 0x8e].contains(op) ? .write : nil // vmaskmovps/pd, vpmaskmovd/q stores
        case .evex(2):
            // vpmov* down-converting stores (F3), compress stores (66), scatters.
            if pp == 2 && (0x10...0x15 ~= op || 0x20...0x25 ~= op || 0x30...0x35 ~= op) { return .write }
            if pp == 1 && [0x63, 0x8a, 0x8b].contains(op) { return .write }
            return (0xa0...0xa3).contains(op) ? .write : nil
        case .map0F3A, .vex(3), .evex(3):
            // pextr*, extractps, vextract{f,i}{128,32x4,64x2,32x8,64x4}, vcvtps2ph.
            return [0x14, 0x15, 0x16, 0x17, 0x19, 0x1b, 0x1d, 0x39, 0x3b].contains(op) ? .write : nil
        default:
            return nil
        }
    }

    /// The size of an instruction's memory operand where Capstone 4.0.2 gets it wrong (mistake 12):
    /// 512 for `fxsave`/`fxrstor`, 108 (94 with a 16-bit operand size) for `fnsave`/`frstor`, 28
    /// (14) for `fnstenv`/`fldenv`, and 0, "set by XCR0", for the XSAVE family (`xsave`,
    /// `xsaveopt`, `xsavec`, `xsaves`, `xrstor`, `xrstors`); `nil` to keep Capstone's.
    static func correctedMemorySize(_ e: X86Encoding) -> Int? {
        guard e.modRMOffset != nil, e.modRM >> 6 != 3 else { return nil }
        let reg = (e.modRM >> 3) & 7
        switch (e.map, e.opcode) {
        case (.primary, 0xdd) where reg == 4 || reg == 6: return e.operandSize == 16 ? 94 : 108
        case (.primary, 0xd9) where reg == 4 || reg == 6: return e.operandSize == 16 ? 14 : 28
        case (.map0F, 0xae) where !e.hasOperandSizePrefix && !e.hasRep && !e.hasRepne:
            switch reg {
            case 0, 1: return 512
            case 4, 5, 6: return 0
            default: return nil
            }
        case (.map0F, 0xc7) where reg == 3 || reg == 4 || reg == 5: return 0
        default: return nil
        }
    }
}

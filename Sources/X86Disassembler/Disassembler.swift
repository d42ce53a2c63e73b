import CCapstone
import VMMKit

/// An x86 disassembler: Capstone 4 for mnemonics, operands, registers and flags,
/// joined with VMMKit's own encoding tables (``X86Encoding``) for lengths and
/// field offsets.
///
/// Every instruction is decoded twice, by Capstone and by the tables; when the
/// lengths differ the instruction is refused (``X86DecodeError/lengthDisagreement(capstone:tables:)``)
/// rather than described wrongly. Capstone 4.0.2's known mistakes, found by
/// comparing it with `as` output and the tables (see `Tests/X86DisassemblerTests`),
/// and how each is handled:
///
/// 1. `66`-prefixed near `call`/`jmp`/`jcc` in 64-bit mode decode with a rel16
///    offset (AMD's reading; Intel ignores the prefix and reads rel32): refused
///    with ``X86DecodeError/vendorDependentBranch``.
/// 2. With a `66` prefix (or VEX.pp = 66) and no REX.W in 64-bit mode, a 32-bit
///    displacement is reported as 2 bytes (`66 89 05 disp32` says `disp_size` 2):
///    field offsets and sizes come from ``X86Encoding``, never from Capstone.
/// 3. `enter iw, ib` reports only its second immediate: ``X86Encoding`` gives both.
/// 4. Memory operand access is wrong for several instructions: SSE/AVX and x87
///    stores (`movups [m], xmm`, `movq [m], xmm`, `fstp`, `stmxcsr`) and `movnti`
///    are reported as reads, `cmpxchg`/`cmpxchg8b`/`cmpxchg16b` as read-only,
///    `test [m], imm` as read-write, and `ins`/`outs` with no access at all:
///    corrected from the opcode (``X86Disassembler/correctedMemoryAccess(_:)``).
/// 5. `loop`/`jrcxz` lack the jump group: groups come from the opcode.
/// 6. EFLAGS reads are missing for `adc`/`sbb`/`rcl`/`rcr`/`cmc`/`adcx` (CF),
///    `adox` (OF), `pushf`/`lahf` (all / the low flags), and shifts whose count
///    may be 0 (flags unchanged): added (``missingFlagsRead(_:bytes:)``).
/// 7. Immediate sizes are reported with the operand size for some imm8 forms
///    (`in eax, imm8` says 4, `66 E5 ib` 2, `rorx` 4) and as garbage for far
///    pointers (`EA`/`9A`, an uninitialized size): fields come from ``X86Encoding``.
/// 8. `ud0`/`ud1` decode without their ModRM byte (2 bytes instead of 3 or more):
///    refused by the length check (``X86DecodeError/lengthDisagreement(capstone:tables:)``).
/// 9. Some EVEX forms are not decoded at all (`vpternlogd zmm, zmm, [m], ib`): ``X86DecodeError/invalid``.
/// 10. Implicit registers are missing: `cmpxchg` writes no accumulator, `syscall`
///     writes nothing (RCX, R11), `xlat` reads nothing (RBX, AL), `enter` neither
///     reads nor writes RSP/RBP: added (``missingRegisters(_:)``).
/// 11. A near `call`/`jmp` with both `67` and REX.W (`67 48 E8 rel32`) decodes with
///     a rel16 (5 bytes instead of 7): refused by the length check.
/// 12. Memory operands are misreported further: `setcc` (all but `sete`/`setne`),
///     `movbe` stores, `kmov` stores, `vmaskmov`/`vpmaskmov` stores, `vextract{f,i}128`
///     and their EVEX forms, the EVEX down-converting `vpmov*`, compress and scatter
///     stores are reported as reads; `fxsave`/`xsave` say 8 bytes and `fnsave` 4:
///     access corrected from the opcode (``X86Disassembler/correctedMemoryAccess(_:)``), sizes
///     from ``X86Disassembler/correctedMemorySize(_:)`` (0 for the XSAVE family, whose area
///     XCR0 sizes).
///
/// Mistakes 8 and 11, and `mov` to/from CR/DR (whose mod bits the tables once
/// honoured), were found by decoding 200,000 random 15-byte strings with both
/// decoders; besides one SSE4a `insertq` in 16-bit mode (Capstone reads `vmread`)
/// those are the only length disagreements left, and every one is refused.
///
/// Not thread-safe: use one per thread.
public final class X86Disassembler {
    /// The mode ``decode(_:address:)`` uses when none is given.
    public let mode: X86Mode
    private var handles: [csh] = [0, 0, 0]
    private var buffers: [UnsafeMutablePointer<cs_insn>?] = [nil, nil, nil]

    /// Opens Capstone for x86 in `mode` (other modes open on first use) with operand details on.
    public init(mode: X86Mode = .bits64) throws(X86DecodeError) {
        _ = X86Disassembler.capstoneWarmedUp
        self.mode = mode
        _ = try handle(for: mode)
    }

    /// Capstone 4 sorts a global table (the registers instructions embed, `X86_insn_reg_intel`)
    /// on its first use without a lock: two threads decoding for the first time at once can read
    /// it half sorted, and an instruction such as `in eax, imm8` then lacks its `eax` operand
    /// (seen as a flaky test here). Every disassembler runs this first; Swift runs a static
    /// initializer exactly once and makes other threads wait for it.
    private static let capstoneWarmedUp: Bool = {
        var h: csh = 0
        guard cs_open(CS_ARCH_X86, CS_MODE_64, &h) == CS_ERR_OK else { return false }
        defer { cs_close(&h) }
        cs_option(h, CS_OPT_DETAIL, Int(CS_OPT_ON.rawValue))
        // in eax, 0x60 (an accumulator embedded in the instruction); out dx, al (two embedded registers).
        let code: [UInt8] = [0xe5, 0x60, 0xee]
        var insn: UnsafeMutablePointer<cs_insn>?
        let n = code.withUnsafeBufferPointer { cs_disasm(h, $0.baseAddress, $0.count, 0, 0, &insn) }
        if let insn { cs_free(insn, n) }
        return n > 0
    }()

    deinit {
        for i in 0..<3 where handles[i] != 0 {
            if let b = buffers[i] { cs_free(b, 1) }
            cs_close(&handles[i])
        }
    }

    private static func slot(_ mode: X86Mode) -> Int {
        switch mode { case .bits16: 0; case .bits32: 1; case .bits64: 2 }
    }

    private func handle(for mode: X86Mode) throws(X86DecodeError) -> (csh, UnsafeMutablePointer<cs_insn>) {
        let s = X86Disassembler.slot(mode)
        if handles[s] != 0, let b = buffers[s] { return (handles[s], b) }
        let m: cs_mode = switch mode {
        case .bits16: CS_MODE_16
        case .bits32: CS_MODE_32
        case .bits64: CS_MODE_64
        }
        var h: csh = 0
        let err = cs_open(CS_ARCH_X86, m, &h)
        guard err == CS_ERR_OK else { throw .capstoneUnavailable(Int(err.rawValue)) }
        cs_option(h, CS_OPT_DETAIL, Int(CS_OPT_ON.rawValue))
        guard let b = cs_malloc(h) else { cs_close(&h); throw .capstoneUnavailable(Int(CS_ERR_MEM.rawValue)) }
        handles[s] = h
        buffers[s] = b
        return (h, b)
    }

    /// Decodes the first instruction of `bytes` as if it were at `address`, in `mode`
    /// (the disassembler's own mode when `nil`).
    public func decode(_ bytes: [UInt8], address: UInt64 = 0, mode: X86Mode? = nil) throws(X86DecodeError) -> X86Instruction {
        let mode = mode ?? self.mode
        guard !bytes.isEmpty else { throw .empty }
        let encoding: X86Encoding
        do throws(X86EncodingError) { encoding = try X86Encoding.decode(bytes, mode: mode) } catch {
            switch error {
            case .truncated(let n): throw .truncated(available: bytes.count, needed: n)
            case .tooLong: throw .tooLong
            case .invalidOpcode: throw .invalid
            }
        }
        if mode == .bits64, encoding.isRelativeBranch, encoding.hasOperandSizePrefix,
           encoding.map == .map0F || [0xe8, 0xe9].contains(encoding.opcode) && encoding.map == .primary {
            throw .vendorDependentBranch
        }
        let (h, insn) = try handle(for: mode)
        let ok = bytes.withUnsafeBufferPointer { b -> Bool in
            var code: UnsafePointer<UInt8>? = b.baseAddress
            var size = min(b.count, 15)
            var addr = address
            return cs_disasm_iter(h, &code, &size, &addr, insn)
        }
        guard ok else { throw .invalid }
        let size = Int(insn.pointee.size)
        guard size == encoding.length else { throw .lengthDisagreement(capstone: size, tables: encoding.length) }
        return convert(insn, handle: h, encoding: encoding, bytes: Array(bytes.prefix(size)))
    }

    /// Decodes consecutive instructions from `bytes`, stopping before the first that does not decode
    /// (or after `maximum` instructions when it is positive).
    public func decodeAll(_ bytes: [UInt8], address: UInt64 = 0, maximum: Int = 0, mode: X86Mode? = nil) -> [X86Instruction] {
        var out: [X86Instruction] = []
        var offset = 0
        while offset < bytes.count, maximum <= 0 || out.count < maximum {
            guard let i = try? decode(Array(bytes[offset...].prefix(15)), address: address &+ UInt64(offset), mode: mode) else { break }
            out.append(i)
            offset += i.length
        }
        return out
    }

    /// The instructions that end exactly at `end`, decoded from the up-to-15 bytes before it
    /// (`bytes` are the bytes at `end - bytes.count ..< end`). Used when a VM exit leaves RIP past
    /// the exiting instruction; ``X86Instruction/reproduces(_:registers:context:)`` narrows them down.
    public func candidatesEnding(at end: UInt64, bytesBefore bytes: [UInt8], mode: X86Mode? = nil) -> [X86Instruction] {
        var out: [X86Instruction] = []
        let bytes = Array(bytes.suffix(15))
        guard end >= UInt64(bytes.count) else { return [] }
        for start in 0..<bytes.count {
            let slice = Array(bytes[start...])
            if let i = try? decode(slice, address: end - UInt64(slice.count), mode: mode), i.length == slice.count { out.append(i) }
        }
        return out
    }

    // MARK: - From Capstone's detail

    private func convert(_ i: UnsafeMutablePointer<cs_insn>, handle h: csh, encoding e: X86Encoding, bytes: [UInt8]) -> X86Instruction {
        let mnemonic = withUnsafeBytes(of: i.pointee.mnemonic) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let opText = withUnsafeBytes(of: i.pointee.op_str) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        var operands: [DecodedOperand] = []
        var capstoneGroups: [UInt8] = []
        var eflags: UInt64 = 0
        var csDisp: X86Field?, csImm: X86Field?
        if let d = i.pointee.detail {
            let x = d.pointee.x86
            eflags = x.eflags
            let enc = x.encoding
            if enc.disp_offset != 0 { csDisp = X86Field(offset: Int(enc.disp_offset), size: Int(enc.disp_size)) }
            if enc.imm_offset != 0 { csImm = X86Field(offset: Int(enc.imm_offset), size: Int(enc.imm_size)) }
            capstoneGroups = withUnsafeBytes(of: d.pointee.groups) { Array($0.prefix(Int(min(d.pointee.groups_count, 8)))) }
            let memoryFix = X86Disassembler.correctedMemoryAccess(e)
            let memorySizeFix = X86Disassembler.correctedMemorySize(e)
            withUnsafeBytes(of: x.operands) { raw in
                let ops = raw.bindMemory(to: cs_x86_op.self)
                for k in 0..<Int(min(x.op_count, 8)) {
                    let op = ops[k]
                    var access = OperandAccess(rawValue: op.access & 3)
                    let operand: X86Operand
                    switch op.type {
                    case X86_OP_REG:
                        guard let r = X86Register(capstone: op.reg.rawValue) else { continue }
                        operand = .register(r)
                    case X86_OP_IMM:
                        operand = .immediate(op.imm)
                    case X86_OP_MEM:
                        var index = X86Register(capstone: op.mem.index.rawValue)
                        if index == .eiz || index == .riz { index = nil }
                        operand = .memory(X86MemoryOperand(
                            segment: X86Register(capstone: op.mem.segment.rawValue),
                            base: X86Register(capstone: op.mem.base.rawValue), index: index,
                            scale: Int(op.mem.scale), displacement: op.mem.disp))
                        if let fix = memoryFix { access = fix }
                        if let size = memorySizeFix { operands.append(DecodedOperand(operand: operand, size: size, access: access)); continue }
                    default:
                        continue
                    }
                    operands.append(DecodedOperand(operand: operand, size: Int(op.size), access: access))
                }
            }
        }
        var readRegs: [X86Register] = [], writeRegs: [X86Register] = []
        var rr = [UInt16](repeating: 0, count: 64), ww = [UInt16](repeating: 0, count: 64)
        var rc: UInt8 = 0, wc: UInt8 = 0
        let ok = rr.withUnsafeMutableBufferPointer { r in
            ww.withUnsafeMutableBufferPointer { w in cs_regs_access(h, i, r.baseAddress, &rc, w.baseAddress, &wc) }
        }
        if ok == CS_ERR_OK {
            for k in 0..<min(Int(rc), 64) { if let r = X86Register(capstone: UInt32(rr[k])) { readRegs.append(r) } }
            for k in 0..<min(Int(wc), 64) { if let r = X86Register(capstone: UInt32(ww[k])) { writeRegs.append(r) } }
        }
        var insn = X86Instruction(
            address: i.pointee.address, length: e.length, bytes: bytes, mnemonic: mnemonic, operandText: opText,
            id: i.pointee.id, operands: operands, registersRead: readRegs, registersWritten: writeRegs,
            flagsRead: [], flagsWritten: [], flagsUndefined: [], encoding: e, groups: [], branch: nil,
            capstoneDisplacement: csDisp, capstoneImmediate: csImm)
        (insn.flagsRead, insn.flagsWritten, insn.flagsUndefined) = X86Disassembler.flags(eflags)
        insn.flagsRead.formUnion(X86Disassembler.missingFlagsRead(e, bytes: bytes))
        let (moreRead, moreWritten) = X86Disassembler.missingRegisters(e)
        for r in moreRead where !insn.registersRead.contains(r) { insn.registersRead.append(r) }
        for r in moreWritten where !insn.registersWritten.contains(r) { insn.registersWritten.append(r) }
        insn.branch = X86Disassembler.relativeBranch(e, bytes: bytes, address: insn.address)
        insn.groups = X86Disassembler.groups(e, operands: operands, capstoneGroups: capstoneGroups)
        return insn
    }

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

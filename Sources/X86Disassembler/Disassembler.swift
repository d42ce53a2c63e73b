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
}

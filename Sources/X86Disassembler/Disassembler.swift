import CCapstone

/// The x86 operating mode to decode in.
public enum X86Mode: Sendable, Hashable {
    /// 16-bit real or protected mode.
    case bits16
    /// 32-bit protected mode.
    case bits32
    /// 64-bit long mode.
    case bits64
}

/// A decoded operand.
public enum X86Operand: Hashable, Sendable {
    /// A register, by Capstone name (`eax`, `dx`).
    case register(String)
    /// An immediate.
    case immediate(Int64)
    /// A memory operand: `segment:[base + index * scale + displacement]`; absent parts are `nil`.
    case memory(segment: String?, base: String?, index: String?, scale: Int, displacement: Int64)
}

/// How an operand is accessed.
public struct OperandAccess: OptionSet, Hashable, Sendable {
    /// The raw bits (Capstone's `CS_AC_*`).
    public let rawValue: UInt8
    /// Creates from raw bits.
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// Read.
    public static let read = OperandAccess(rawValue: 1)
    /// Written.
    public static let write = OperandAccess(rawValue: 2)
}

/// A decoded operand with its size and access.
public struct DecodedOperand: Hashable, Sendable {
    /// The operand.
    public var operand: X86Operand
    /// Its size in bytes.
    public var size: Int
    /// Read, write or both.
    public var access: OperandAccess
}

/// One decoded x86 instruction.
public struct X86Instruction: Hashable, Sendable, CustomStringConvertible {
    /// The address it was decoded at.
    public var address: UInt64
    /// Its length in bytes.
    public var length: Int
    /// The raw bytes.
    public var bytes: [UInt8]
    /// The mnemonic (`out`, `mov`).
    public var mnemonic: String
    /// The operand text (`dx, al`).
    public var operandText: String
    /// The explicit operands.
    public var operands: [DecodedOperand]
    /// Registers read, explicit and implicit, by name.
    public var registersRead: [String]
    /// Registers written, explicit and implicit, by name.
    public var registersWritten: [String]
    /// The legacy prefixes present (up to 4 bytes; 0 when absent).
    public var prefixes: [UInt8]

    /// `mnemonic operands`.
    public var description: String { operandText.isEmpty ? mnemonic : "\(mnemonic) \(operandText)" }
}

/// Errors from the disassembler.
public enum DisassemblerError: Error, Hashable, Sendable {
    /// Capstone could not be opened (`cs_open` failed with this `cs_err`).
    case openFailed(Int)
}

/// An x86 disassembler over Capstone, with operand details.
///
/// Not thread-safe: use one per thread.
public final class X86Disassembler {
    private var handle: csh = 0
    /// The mode this disassembler decodes in.
    public let mode: X86Mode

    /// Opens Capstone for x86 in `mode` with operand details on.
    public init(mode: X86Mode = .bits64) throws(DisassemblerError) {
        self.mode = mode
        let m: cs_mode = switch mode {
        case .bits16: CS_MODE_16
        case .bits32: CS_MODE_32
        case .bits64: CS_MODE_64
        }
        var h: csh = 0
        let err = cs_open(CS_ARCH_X86, m, &h)
        guard err == CS_ERR_OK else { throw .openFailed(Int(err.rawValue)) }
        cs_option(h, CS_OPT_DETAIL, Int(CS_OPT_ON.rawValue))
        handle = h
    }

    deinit { cs_close(&handle) }

    /// Decodes the first instruction of `bytes` as if it were at `address`; `nil` when they do not start a valid instruction.
    public func decode(_ bytes: [UInt8], address: UInt64 = 0) -> X86Instruction? {
        guard !bytes.isEmpty else { return nil }
        var insn: UnsafeMutablePointer<cs_insn>?
        let n = bytes.withUnsafeBufferPointer { b in cs_disasm(handle, b.baseAddress, b.count, address, 1, &insn) }
        guard n == 1, let i = insn else { return nil }
        defer { cs_free(insn, n) }
        return convert(i)
    }

    /// Decodes consecutive instructions from `bytes` (stops at the first invalid one).
    public func decodeAll(_ bytes: [UInt8], address: UInt64 = 0, maximum: Int = 0) -> [X86Instruction] {
        guard !bytes.isEmpty else { return [] }
        var insn: UnsafeMutablePointer<cs_insn>?
        let n = bytes.withUnsafeBufferPointer { b in cs_disasm(handle, b.baseAddress, b.count, address, maximum, &insn) }
        guard n > 0, let base = insn else { return [] }
        defer { cs_free(insn, n) }
        return (0..<n).map { convert(base + $0) }
    }

    /// The instructions that end exactly at `end`, decoded from the up-to-15 bytes before it
    /// (`bytes` are the bytes at `end - bytes.count ..< end`). Used when a VM exit leaves RIP past
    /// the exiting instruction.
    public func candidatesEnding(at end: UInt64, bytesBefore bytes: [UInt8]) -> [X86Instruction] {
        var out: [X86Instruction] = []
        guard end >= UInt64(bytes.count) else { return [] }
        for start in 0..<bytes.count {
            let slice = Array(bytes[start...])
            if let i = decode(slice, address: end - UInt64(slice.count)), i.length == slice.count { out.append(i) }
        }
        return out
    }

    private func name(_ reg: UInt32) -> String? {
        guard reg != 0, let p = cs_reg_name(handle, reg) else { return nil }
        return String(cString: p)
    }

    private func convert(_ i: UnsafeMutablePointer<cs_insn>) -> X86Instruction {
        let size = Int(i.pointee.size)
        let bytes = withUnsafeBytes(of: i.pointee.bytes) { Array($0.prefix(size)) }
        let mnemonic = withUnsafeBytes(of: i.pointee.mnemonic) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let opText = withUnsafeBytes(of: i.pointee.op_str) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        var operands: [DecodedOperand] = []
        var prefixes: [UInt8] = []
        if let d = i.pointee.detail {
            let x = d.pointee.x86
            prefixes = withUnsafeBytes(of: x.prefix) { Array($0) }
            withUnsafeBytes(of: x.operands) { raw in
                let ops = raw.bindMemory(to: cs_x86_op.self)
                for k in 0..<Int(min(x.op_count, 8)) {
                    let op = ops[k]
                    let operand: X86Operand
                    switch op.type {
                    case X86_OP_REG: operand = .register(name(op.reg.rawValue) ?? "?")
                    case X86_OP_IMM: operand = .immediate(op.imm)
                    case X86_OP_MEM:
                        operand = .memory(segment: name(op.mem.segment.rawValue), base: name(op.mem.base.rawValue),
                                          index: name(op.mem.index.rawValue), scale: Int(op.mem.scale), displacement: op.mem.disp)
                    default: continue
                    }
                    operands.append(DecodedOperand(operand: operand, size: Int(op.size), access: OperandAccess(rawValue: op.access)))
                }
            }
        }
        var readRegs: [String] = [], writeRegs: [String] = []
        var rr = [UInt16](repeating: 0, count: 64), ww = [UInt16](repeating: 0, count: 64)
        var rc: UInt8 = 0, wc: UInt8 = 0
        let ok = rr.withUnsafeMutableBufferPointer { r in
            ww.withUnsafeMutableBufferPointer { w in cs_regs_access(handle, i, r.baseAddress, &rc, w.baseAddress, &wc) }
        }
        if ok == CS_ERR_OK {
            for k in 0..<min(Int(rc), 64) { if let n = name(UInt32(rr[k])) { readRegs.append(n) } }
            for k in 0..<min(Int(wc), 64) { if let n = name(UInt32(ww[k])) { writeRegs.append(n) } }
        }
        return X86Instruction(address: i.pointee.address, length: size, bytes: bytes, mnemonic: mnemonic,
                              operandText: opText, operands: operands, registersRead: readRegs,
                              registersWritten: writeRegs, prefixes: prefixes)
    }
}

/// Where a field of an instruction lies in its bytes.
public struct X86Field: Hashable, Sendable {
    /// The offset of the field's first byte from the instruction's first byte.
    public var offset: Int
    /// The field's size in bytes.
    public var size: Int
    /// Creates a field.
    public init(offset: Int, size: Int) { self.offset = offset; self.size = size }
    /// The field's range in the instruction's bytes.
    public var range: Range<Int> { offset..<offset + size }

    /// The field's little-endian value in `bytes`, sign-extended; `nil` if the field is not inside them.
    public func signedValue(in bytes: [UInt8]) -> Int64? {
        guard offset >= 0, (1...8).contains(size), offset + size <= bytes.count else { return nil }
        var raw: UInt64 = 0
        for k in (0..<size).reversed() { raw = raw << 8 | UInt64(bytes[offset + k]) }
        let shift = UInt64(64 - 8 * size)
        return Int64(bitPattern: raw << shift) >> Int64(shift)
    }
}

/// The opcode map an instruction's opcode byte belongs to.
public enum X86OpcodeMap: Hashable, Sendable {
    /// The one-byte map.
    case primary
    /// `0F xx`.
    case map0F
    /// `0F 38 xx`.
    case map0F38
    /// `0F 3A xx`.
    case map0F3A
    /// AMD 3DNow! (`0F 0F modrm imm8`, the opcode is the trailing byte).
    case threeDNow
    /// A VEX map (`mmmmm`: 1 = 0F, 2 = 0F38, 3 = 0F3A).
    case vex(UInt8)
    /// An EVEX map (`mmm`: 1 = 0F, 2 = 0F38, 3 = 0F3A, 5, 6).
    case evex(UInt8)
    /// An AMD XOP map (8, 9 or 10).
    case xop(UInt8)
}

/// The instruction's structure, computed from its bytes by VMMKit's own table
/// decoder (independent of Capstone): prefixes, opcode, ModRM/SIB and the exact
/// byte offsets and sizes of the displacement and immediate fields.
///
/// Capstone 4.0.2 reports some of these wrongly (see ``X86Disassembler``), so
/// everything that patches or relocates bytes uses these fields.
public struct X86Encoding: Hashable, Sendable {
    /// The mode the bytes were decoded in.
    public var mode: X86Mode
    /// The instruction's length in bytes (1–15).
    public var length: Int
    /// The legacy prefix bytes in order (`F0 F2 F3 2E 36 3E 26 64 65 66 67`).
    public var legacyPrefixes: [UInt8]
    /// The REX byte when it is in effect (64-bit mode, directly before the opcode); VEX/EVEX/XOP carry theirs inside.
    public var rex: UInt8?
    /// The VEX/EVEX/XOP prefix's offset and size (2, 3 or 4 bytes), if any.
    public var vectorPrefix: X86Field?
    /// Whether VEX.W / EVEX.W / XOP.W is set (false without such a prefix).
    public var vexW: Bool
    /// The prefix a VEX/EVEX/XOP `pp` field implies: 0 none, 1 = `66`, 2 = `F3`, 3 = `F2` (0 without such a prefix).
    public var vexPP: UInt8
    /// The opcode map.
    public var map: X86OpcodeMap
    /// The opcode byte (the last one for multi-byte opcodes).
    public var opcode: UInt8
    /// The offset of ``opcode`` in the bytes (for 3DNow!, of the `0F 0F` escape's second byte).
    public var opcodeOffset: Int
    /// The ModRM byte's offset, if the instruction has one.
    public var modRMOffset: Int?
    /// The ModRM byte's value (0 when absent).
    public var modRM: UInt8
    /// The SIB byte's offset, if the instruction has one.
    public var sibOffset: Int?
    /// The displacement field (ModRM displacement or a `moffs` address), if any. For EVEX
    /// a 1-byte displacement is compressed: the field holds the displacement divided by the operand's N.
    public var displacement: X86Field?
    /// The (first) immediate field, if any; for a relative branch it holds the relative offset.
    public var immediate: X86Field?
    /// A second immediate (`enter`'s level, the selector of a far `ptr16:32`, SSE4a `extrq`/`insertq`).
    public var secondImmediate: X86Field?
    /// The effective address size in bits (16, 32 or 64).
    public var addressSize: Int
    /// The effective operand size in bits for general-purpose instructions (16, 32 or 64; REX.W gives 64).
    public var operandSize: Int
    /// Whether ``immediate`` is a relative branch offset (`jmp`/`call`/`jcc`/`loop`/`jrcxz`/`xbegin`).
    public var isRelativeBranch: Bool
    /// Whether the ModRM operand is RIP-relative (64-bit mode, `mod = 00`, `r/m = 101`, no SIB).
    public var isRIPRelative: Bool

    /// Whether an `F0` (lock) prefix is present.
    public var hasLock: Bool { legacyPrefixes.contains(0xf0) }
    /// Whether an `F3` (rep/repe) prefix is present.
    public var hasRep: Bool { legacyPrefixes.contains(0xf3) }
    /// Whether an `F2` (repne/bnd) prefix is present.
    public var hasRepne: Bool { legacyPrefixes.contains(0xf2) }
    /// Whether a `66` (operand-size) prefix is present.
    public var hasOperandSizePrefix: Bool { legacyPrefixes.contains(0x66) }
    /// Whether a `67` (address-size) prefix is present.
    public var hasAddressSizePrefix: Bool { legacyPrefixes.contains(0x67) }
    /// The last segment-override prefix byte (`2E 36 3E 26 64 65`), if any. In 64-bit mode only `64` (fs) and `65` (gs) change an address.
    public var segmentOverride: UInt8? { legacyPrefixes.last { [0x2e, 0x36, 0x3e, 0x26, 0x64, 0x65].contains($0) } }
}

/// Why the table decoder could not give an instruction's structure.
public enum X86EncodingError: Error, Hashable, Sendable {
    /// The bytes end before the instruction does; `needed` is a lower bound of the full length.
    case truncated(needed: Int)
    /// The encoding is longer than the architectural limit of 15 bytes.
    case tooLong
    /// The opcode is undefined in this mode (`push es` in 64-bit mode, `0F 0A`...).
    case invalidOpcode
}

extension X86Encoding {
    /// Decodes the structure of the instruction at the start of `bytes` in `mode`.
    ///
    /// The tables follow the Intel SDM volume 2 opcode maps (appendix A) and AMD's
    /// for 3DNow!/XOP. Lengths do not depend on the vendor except for `66`-prefixed
    /// near relative branches in 64-bit mode (Intel ignores the prefix, AMD takes a
    /// 16-bit offset); this decoder gives Intel's length and sets the prefix, and
    /// ``X86Disassembler`` refuses those branches.
    public static func decode(_ bytes: some Collection<UInt8>, mode: X86Mode) throws(X86EncodingError) -> X86Encoding {
        var d = TableDecoder(bytes: Array(bytes.prefix(15)), mode: mode)
        return try d.run()
    }
}

/// The table decoder's state while it walks one instruction.
private struct TableDecoder {
    let bytes: [UInt8]
    let mode: X86Mode
    var pos = 0

    init(bytes: [UInt8], mode: X86Mode) { self.bytes = bytes; self.mode = mode }

    mutating func next() throws(X86EncodingError) -> UInt8 {
        guard pos < 15 else { throw .tooLong }
        guard pos < bytes.count else { throw .truncated(needed: pos + 1) }
        defer { pos += 1 }
        return bytes[pos]
    }

    func peek(_ ahead: Int = 0) -> UInt8? { pos + ahead < bytes.count ? bytes[pos + ahead] : nil }

    mutating func field(_ size: Int) throws(X86EncodingError) -> X86Field? {
        guard size > 0 else { return nil }
        let f = X86Field(offset: pos, size: size)
        guard pos + size <= 15 else { throw .tooLong }
        guard pos + size <= bytes.count else { throw .truncated(needed: pos + size) }
        pos += size
        return f
    }

    mutating func run() throws(X86EncodingError) -> X86Encoding {
        var prefixes: [UInt8] = []
        var rex: UInt8?
        // Legacy prefixes, then REX (a REX followed by anything but the opcode is ignored).
        while true {
            guard let b = peek() else { _ = try next(); break }
            if [0xf0, 0xf2, 0xf3, 0x2e, 0x36, 0x3e, 0x26, 0x64, 0x65, 0x66, 0x67].contains(b) {
                prefixes.append(b); rex = nil; _ = try next(); continue
            }
            if mode == .bits64, b & 0xf0 == 0x40 { rex = b; _ = try next(); continue }
            break
        }
        let opsize66 = prefixes.contains(0x66), addr67 = prefixes.contains(0x67)
        let rexW = (rex ?? 0) & 8 != 0
        let addressSize: Int = switch mode {
        case .bits64: addr67 ? 32 : 64
        case .bits32: addr67 ? 16 : 32
        case .bits16: addr67 ? 32 : 16
        }
        var operandSize: Int = switch mode {
        case .bits64: rexW ? 64 : (opsize66 ? 16 : 32)
        case .bits32: opsize66 ? 16 : 32
        case .bits16: opsize66 ? 32 : 16
        }
        let z = operandSize == 16 ? 2 : 4
        var e = X86Encoding(mode: mode, length: 0, legacyPrefixes: prefixes, rex: rex, vectorPrefix: nil, vexW: false, vexPP: 0,
                            map: .primary, opcode: 0, opcodeOffset: 0, modRMOffset: nil, modRM: 0, sibOffset: nil,
                            displacement: nil, immediate: nil, secondImmediate: nil, addressSize: addressSize,
                            operandSize: operandSize, isRelativeBranch: false, isRIPRelative: false)
        let is64 = mode == .bits64
        var op = try next()
        e.opcodeOffset = pos - 1

        // VEX / EVEX / XOP. Outside 64-bit mode C4/C5/62 are LES/LDS/BOUND unless the next byte has mod = 11.
        if op == 0xc4 || op == 0xc5 || op == 0x62 || op == 0x8f, rex == nil, let n = peek(),
           op == 0x8f ? n & 0x1f >= 8 : (is64 || n & 0xc0 == 0xc0) {
            let start = pos - 1
            let size = op == 0xc5 ? 2 : op == 0x62 ? 4 : 3
            _ = try field(size - 1)
            e.vectorPrefix = X86Field(offset: start, size: size)
            let p1 = bytes[start + 1]
            let map: UInt8 = op == 0xc5 ? 1 : op == 0x62 ? p1 & 0x07 : p1 & 0x1f
            if op != 0xc5 { e.vexW = bytes[start + 2] & 0x80 != 0 }
            e.vexPP = (op == 0xc5 ? p1 : bytes[start + 2]) & 3
            if e.vexW && is64 { operandSize = 64 }
            e.map = op == 0x8f ? .xop(map) : op == 0x62 ? .evex(map) : .vex(map)
            guard op == 0x8f ? (8...10).contains(map) : (op == 0x62 ? [1, 2, 3, 5, 6].contains(map) : (1...3).contains(map)) else {
                throw .invalidOpcode
            }
            op = try next()
            e.opcode = op
            e.opcodeOffset = pos - 1
            // vzeroupper / vzeroall are the only VEX instructions without ModRM.
            if !(op == 0x77 && e.map == .vex(1)) { try modRM(&e) }
            let imm8: Bool = switch (op, map) {
            case (_, 3), (_, 8): true
            case (0x70...0x73, 1), (0xc2, 1), (0xc4...0xc6, 1): true
            default: false
            }
            if case .xop(10) = e.map { e.immediate = try field(4) } else if imm8 { e.immediate = try field(1) }
            e.operandSize = operandSize
            e.length = pos
            return e
        }

        if op == 0x0f {
            let b2 = try next()
            e.opcodeOffset = pos - 1
            switch b2 {
            case 0x38:
                e.map = .map0F38; e.opcode = try next(); e.opcodeOffset = pos - 1
                try modRM(&e)
            case 0x3a:
                e.map = .map0F3A; e.opcode = try next(); e.opcodeOffset = pos - 1
                try modRM(&e)
                e.immediate = try field(1)
            case 0x0f:
                e.map = .threeDNow
                try modRM(&e)
                e.immediate = try field(1)
                e.opcode = bytes[pos - 1]
            default:
                e.map = .map0F; e.opcode = b2
                try twoByte(&e, b2, z: z)
            }
            e.length = pos
            return e
        }

        e.opcode = op
        try oneByte(&e, op, z: z)
        e.length = pos
        return e
    }

    /// The one-byte map.
    mutating func oneByte(_ e: inout X86Encoding, _ op: UInt8, z: Int) throws(X86EncodingError) {
        let is64 = mode == .bits64
        let invalidIn64: Set<UInt8> = [0x06, 0x07, 0x0e, 0x16, 0x17, 0x1e, 0x1f, 0x27, 0x2f, 0x37, 0x3f,
                                        0x60, 0x61, 0x62, 0x82, 0x9a, 0xc4, 0xc5, 0xce, 0xd4, 0xd5, 0xd6, 0xea]
        if is64 && invalidIn64.contains(op) { throw .invalidOpcode }
        switch op {
        case 0x00...0x3f:
            switch op & 7 {
            case 0...3: try modRM(&e)
            case 4: e.immediate = try field(1)
            case 5: e.immediate = try field(z)
            default: break // segment push/pop, prefixes (handled), BCD adjust
            }
        case 0x40...0x61, 0x90...0x99, 0x9b...0x9f, 0xa4...0xa7, 0xaa...0xaf, 0xc3, 0xc9, 0xcb, 0xcc, 0xce, 0xcf,
             0xd6, 0xd7, 0xec...0xef, 0xf1, 0xf4, 0xf5, 0xf8...0xfd, 0x6c...0x6f:
            break
        case 0x62, 0x63, 0x84...0x8f, 0xc4, 0xc5, 0xd0...0xd3, 0xd8...0xdf, 0xfe, 0xff:
            try modRM(&e)
        case 0x68: e.immediate = try field(z)
        case 0x69: try modRM(&e); e.immediate = try field(z)
        case 0x6a, 0xa8, 0xb0...0xb7, 0xcd, 0xd4, 0xd5, 0xe4...0xe7: e.immediate = try field(1)
        case 0x6b, 0x80, 0x82, 0x83, 0xc0, 0xc1, 0xc6: try modRM(&e); e.immediate = try field(1)
        case 0x81: try modRM(&e); e.immediate = try field(z)
        case 0xc7:
            try modRM(&e); e.immediate = try field(z)
            e.isRelativeBranch = e.modRM == 0xf8 // xbegin
        case 0x70...0x7f, 0xe0...0xe3, 0xeb:
            e.immediate = try field(1); e.isRelativeBranch = true
        case 0xe8, 0xe9:
            // Near branches: 64-bit mode uses rel32 whatever the operand size (Intel).
            e.immediate = try field(is64 ? 4 : z); e.isRelativeBranch = true
        case 0x9a, 0xea:
            e.immediate = try field(z); e.secondImmediate = try field(2)
        case 0xa0...0xa3:
            e.displacement = try field(e.addressSize / 8)
        case 0xa9: e.immediate = try field(z)
        case 0xb8...0xbf: e.immediate = try field(e.operandSize == 64 ? 8 : z)
        case 0xc2, 0xca: e.immediate = try field(2)
        case 0xc8: e.immediate = try field(2); e.secondImmediate = try field(1)
        case 0xf6, 0xf7:
            try modRM(&e)
            if (e.modRM >> 3) & 7 < 2 { e.immediate = try field(op == 0xf6 ? 1 : z) }
        default:
            throw .invalidOpcode
        }
    }

    /// The two-byte map (`0F xx`).
    mutating func twoByte(_ e: inout X86Encoding, _ op: UInt8, z: Int) throws(X86EncodingError) {
        switch op {
        case 0x04, 0x0a, 0x0c, 0x24...0x27, 0x36, 0x39, 0x3b...0x3f, 0x7a, 0x7b, 0xa6, 0xa7:
            throw .invalidOpcode
        case 0x05...0x09, 0x0b, 0x0e, 0x30...0x35, 0x37, 0x77, 0xa0...0xa2, 0xa8...0xaa, 0xc8...0xcf:
            break
        case 0x20...0x23:
            // mov to/from CR/DR: the mod bits are ignored, the operand is always a register.
            e.modRM = try next()
            e.modRMOffset = pos - 1
        case 0x70...0x73, 0xa4, 0xac, 0xba, 0xc2, 0xc4...0xc6:
            try modRM(&e); e.immediate = try field(1)
        case 0x78 where (e.legacyPrefixes.contains(0x66) || e.legacyPrefixes.contains(0xf2)) && (peek() ?? 0) >> 6 == 3:
            // SSE4a extrq / insertq with two imm8 (register forms only; with memory it reads as vmread).
            try modRM(&e); e.immediate = try field(1); e.secondImmediate = try field(1)
        case 0x80...0x8f:
            e.immediate = try field(mode == .bits64 ? 4 : z); e.isRelativeBranch = true
        default:
            try modRM(&e)
        }
    }

    /// ModRM, SIB and displacement.
    mutating func modRM(_ e: inout X86Encoding) throws(X86EncodingError) {
        let m = try next()
        e.modRMOffset = pos - 1
        e.modRM = m
        let mod = m >> 6, rm = m & 7
        guard mod != 3 else { return }
        if e.addressSize == 16 {
            if mod == 1 { e.displacement = try field(1) }
            else if mod == 2 || (mod == 0 && rm == 6) { e.displacement = try field(2) }
            return
        }
        var baseIsNone = false
        if rm == 4 {
            let sib = try next()
            e.sibOffset = pos - 1
            baseIsNone = sib & 7 == 5 && mod == 0
        }
        if mod == 1 { e.displacement = try field(1) }
        else if mod == 2 || baseIsNone || (mod == 0 && rm == 5) { e.displacement = try field(4) }
        e.isRIPRelative = mode == .bits64 && mod == 0 && rm == 5
    }
}

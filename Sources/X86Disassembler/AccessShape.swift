/// How a plain device access moves its value, for an instruction DMP may serve
/// itself (DESIGN.md, "Ask the device": only plain loads, stores and IN/OUT).
public enum X86AccessShape: Hashable, Sendable {
    /// `in al/ax/eax, imm8` or `in al/ax/eax, dx`: the value goes to `destination`.
    case portIn(width: Int, destination: X86Register, portInDX: Bool)
    /// `out imm8, al/ax/eax` or `out dx, al/ax/eax`: the value comes from `source`.
    case portOut(width: Int, source: X86Register, portInDX: Bool)
    /// `mov reg, [mem]` (and `movzx`/`movsx` with ``extension``): the value goes to `destination`.
    case load(width: Int, destination: X86Register, memory: X86MemoryOperand, extension: X86LoadExtension)
    /// `mov [mem], reg` or `mov [mem], imm`: the value comes from `source`.
    case store(width: Int, source: X86Operand, memory: X86MemoryOperand)
}

/// How a load widens its value into the destination register.
public enum X86LoadExtension: Hashable, Sendable {
    /// `mov`: none (a 32-bit destination still clears bits 63:32, as every 32-bit write does).
    case none
    /// `movzx`.
    case zero
    /// `movsx` / `movsxd`.
    case sign
}

/// Why an instruction is not a plain device access.
public enum X86AccessRefusal: Error, Hashable, Sendable, CustomStringConvertible {
    /// It is not a load, store or port I/O (or reaches memory in another way: `push`, `call [m]`...).
    case notPlainAccess
    /// It reads and writes its memory operand (`add [m], r`, `xchg`, `cmpxchg`).
    case readModifyWrite
    /// It has a `lock` prefix.
    case locked
    /// A string instruction (`movs`, `stos`, `ins`, `outs`...).
    case string
    /// It writes flags (`cmp [m], r`, `test [m], imm`).
    case setsFlags
    /// An `fs`/`gs` segment override or a `67` address-size prefix on the memory operand.
    case segmentOrAddressSize

    /// A one-line description.
    public var description: String {
        switch self {
        case .notPlainAccess: "not a plain load, store or port I/O"
        case .readModifyWrite: "read-modify-write"
        case .locked: "locked"
        case .string: "string instruction"
        case .setsFlags: "sets flags"
        case .segmentOrAddressSize: "fs/gs or 67 prefix"
        }
    }
}

extension X86Instruction {
    /// The instruction as a plain device access, or why it is not one. Plain means: `in`/`out`
    /// (not `ins`/`outs`), `mov`/`movzx`/`movsx`/`movsxd` between a general-purpose register and
    /// memory, `mov` of an immediate to memory; no `lock`, no `fs`/`gs` override, no `67` prefix.
    public var accessShape: Result<X86AccessShape, X86AccessRefusal> {
        if groups.contains(.string) { return .failure(.string) }
        if groups.contains(.locked) { return .failure(.locked) }
        let e = encoding
        let registers = operands.compactMap { if case .register(let r) = $0.operand { r } else { nil } }
        if groups.contains(.portIO), let width = ioWidth, let reg = registers.first(where: { $0.generalPurpose?.number == 0 }) {
            let inDX = e.opcode >= 0xec
            return ioDirection == .read ? .success(.portIn(width: width, destination: reg, portInDX: inDX))
                                        : .success(.portOut(width: width, source: reg, portInDX: inDX))
        }
        guard let memOp = memoryOperands.first, let mem = memOp.memory, memoryOperands.count == 1 else {
            return .failure(.notPlainAccess)
        }
        if memOp.access == [.read, .write] { return .failure(.readModifyWrite) }
        if !flagsWritten.isEmpty { return .failure(.setsFlags) }
        guard e.map == .primary || e.map == .map0F else { return .failure(.notPlainAccess) }
        let load: X86LoadExtension?
        switch (e.map, e.opcode) {
        case (.primary, 0x8a), (.primary, 0x8b), (.primary, 0xa0), (.primary, 0xa1): load = X86LoadExtension.none
        case (.map0F, 0xb6), (.map0F, 0xb7): load = X86LoadExtension.zero
        case (.map0F, 0xbe), (.map0F, 0xbf), (.primary, 0x63): load = X86LoadExtension.sign
        case (.primary, 0x88), (.primary, 0x89), (.primary, 0xa2), (.primary, 0xa3): load = nil
        case (.primary, 0xc6) where (e.modRM >> 3) & 7 == 0, (.primary, 0xc7) where (e.modRM >> 3) & 7 == 0: load = nil
        default: return .failure(.notPlainAccess)
        }
        if e.hasAddressSizePrefix || mem.segment == .fs || mem.segment == .gs { return .failure(.segmentOrAddressSize) }
        let width = memOp.size
        if let ext = load {
            guard let dest = registers.first, dest.generalPurpose != nil else { return .failure(.notPlainAccess) }
            return .success(.load(width: width, destination: dest, memory: mem, extension: ext))
        }
        guard let source = operands.first(where: { $0.memory == nil })?.operand else { return .failure(.notPlainAccess) }
        return .success(.store(width: width, source: source, memory: mem))
    }
}

import VMMKit

/// A memory operand: `segment:[base + index * scale + displacement]`.
public struct X86MemoryOperand: Hashable, Sendable {
    /// The segment named by an override prefix (`nil`: the default segment).
    public var segment: X86Register?
    /// The base register (`rip`/`eip` for RIP-relative operands), if any.
    public var base: X86Register?
    /// The index register, if any (never `eiz`/`riz`: those are dropped).
    public var index: X86Register?
    /// The index scale (1, 2, 4 or 8).
    public var scale: Int
    /// The displacement, sign-extended (for EVEX already multiplied by the compression factor N).
    public var displacement: Int64

    /// Creates a memory operand.
    public init(segment: X86Register? = nil, base: X86Register? = nil, index: X86Register? = nil,
                scale: Int = 1, displacement: Int64 = 0) {
        self.segment = segment; self.base = base; self.index = index; self.scale = scale; self.displacement = displacement
    }

    /// Whether the address is relative to the next instruction.
    public var isRIPRelative: Bool { base == .rip || base == .eip }
}

/// A decoded operand.
public enum X86Operand: Hashable, Sendable {
    /// A register.
    case register(X86Register)
    /// An immediate (for relative branches Capstone gives the target address here).
    case immediate(Int64)
    /// A memory operand.
    case memory(X86MemoryOperand)
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
    /// Its size in bytes; 0 for the memory operand of the XSAVE family (`xsave`, `xrstor`...),
    /// whose area size depends on XCR0.
    public var size: Int
    /// Read, write or both (memory operands corrected where Capstone 4.0.2 is wrong; see ``X86Disassembler``).
    public var access: OperandAccess

    /// The memory operand, if this is one.
    public var memory: X86MemoryOperand? { if case .memory(let m) = operand { m } else { nil } }
}

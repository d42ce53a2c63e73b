import VMMKit

/// One decoded x86 instruction: Capstone's view (mnemonic, operands, registers,
/// flags) joined with VMMKit's own encoding tables (``encoding``).
public struct X86Instruction: Hashable, Sendable, CustomStringConvertible {
    /// The address it was decoded at.
    public var address: UInt64
    /// Its length in bytes (agreed by Capstone and ``X86Encoding``).
    public var length: Int
    /// The raw bytes.
    public var bytes: [UInt8]
    /// The mnemonic (`out`, `mov`).
    public var mnemonic: String
    /// The operand text (`dx, al`).
    public var operandText: String
    /// Capstone's instruction id (`x86_insn`).
    public var id: UInt32
    /// The explicit operands.
    public var operands: [DecodedOperand]
    /// Registers read, explicit and implicit.
    public var registersRead: [X86Register]
    /// Registers written, explicit and implicit.
    public var registersWritten: [X86Register]
    /// Flags the instruction's result depends on (tested, or passed through unchanged in some cases).
    public var flagsRead: X86Flags
    /// Flags the instruction changes (modified, set, cleared or left undefined).
    public var flagsWritten: X86Flags
    /// Flags the instruction leaves undefined.
    public var flagsUndefined: X86Flags
    /// The instruction's structure from VMMKit's tables: prefixes, opcode, field offsets.
    public var encoding: X86Encoding
    /// What kind of instruction it is.
    public var groups: X86InstructionGroups
    /// For a relative branch: its target and offset field.
    public var branch: X86RelativeBranch?
    /// The displacement field as Capstone reports it (`cs_x86_encoding`), kept to test its known mistakes.
    package var capstoneDisplacement: X86Field?
    /// The immediate field as Capstone reports it, kept to test its known mistakes.
    package var capstoneImmediate: X86Field?

    /// The address of the next instruction.
    public var nextAddress: UInt64 { address &+ UInt64(length) }
    /// The mode it was decoded in.
    public var mode: X86Mode { encoding.mode }
    /// The explicit memory operands.
    public var memoryOperands: [DecodedOperand] { operands.filter { $0.memory != nil } }

    /// `mnemonic operands`.
    public var description: String { operandText.isEmpty ? mnemonic : "\(mnemonic) \(operandText)" }
}

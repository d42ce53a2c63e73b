import VMMKit

/// The x86 operating mode to decode in.
public enum X86Mode: Sendable, Hashable {
    /// 16-bit real or protected mode.
    case bits16
    /// 32-bit protected mode.
    case bits32
    /// 64-bit long mode.
    case bits64
}

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

/// EFLAGS bits, as sets of flags an instruction reads or writes.
public struct X86Flags: OptionSet, Hashable, Sendable, CustomStringConvertible {
    /// The bits, at their EFLAGS positions.
    public let rawValue: UInt32
    /// Creates from EFLAGS bit positions.
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Carry.
    public static let carry = X86Flags(rawValue: 1 << 0)
    /// Parity.
    public static let parity = X86Flags(rawValue: 1 << 2)
    /// Auxiliary carry.
    public static let auxiliaryCarry = X86Flags(rawValue: 1 << 4)
    /// Zero.
    public static let zero = X86Flags(rawValue: 1 << 6)
    /// Sign.
    public static let sign = X86Flags(rawValue: 1 << 7)
    /// Trap.
    public static let trap = X86Flags(rawValue: 1 << 8)
    /// Interrupt enable.
    public static let interrupt = X86Flags(rawValue: 1 << 9)
    /// Direction.
    public static let direction = X86Flags(rawValue: 1 << 10)
    /// Overflow.
    public static let overflow = X86Flags(rawValue: 1 << 11)
    /// Nested task.
    public static let nestedTask = X86Flags(rawValue: 1 << 14)
    /// Resume.
    public static let resume = X86Flags(rawValue: 1 << 16)
    /// Alignment check.
    public static let alignmentCheck = X86Flags(rawValue: 1 << 18)
    /// The six arithmetic flags (CF, PF, AF, ZF, SF, OF).
    public static let arithmetic: X86Flags = [.carry, .parity, .auxiliaryCarry, .zero, .sign, .overflow]

    /// e.g. `CF ZF`.
    public var description: String {
        let names: [(X86Flags, String)] = [(.carry, "CF"), (.parity, "PF"), (.auxiliaryCarry, "AF"), (.zero, "ZF"), (.sign, "SF"),
                                           (.trap, "TF"), (.interrupt, "IF"), (.direction, "DF"), (.overflow, "OF"),
                                           (.nestedTask, "NT"), (.resume, "RF"), (.alignmentCheck, "AC")]
        return names.filter { contains($0.0) }.map(\.1).joined(separator: " ")
    }
}

/// What kind of instruction this is, for the decisions DMP's planner makes.
public struct X86InstructionGroups: OptionSet, Hashable, Sendable {
    /// The raw bits.
    public let rawValue: UInt32
    /// Creates from raw bits.
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Any jump (`jmp`, `jcc`, `loop`, `jrcxz`, `xbegin`'s abort path).
    public static let jump = X86InstructionGroups(rawValue: 1 << 0)
    /// A conditional branch (`jcc`, `loop*`, `jrcxz`/`jecxz`).
    public static let conditionalBranch = X86InstructionGroups(rawValue: 1 << 1)
    /// A call.
    public static let call = X86InstructionGroups(rawValue: 1 << 2)
    /// A return (`ret`, `retf`).
    public static let `return` = X86InstructionGroups(rawValue: 1 << 3)
    /// A branch with a relative offset in its immediate field (see ``X86Instruction/branch``).
    public static let relativeBranch = X86InstructionGroups(rawValue: 1 << 4)
    /// A jump or call through a register or memory (`jmp rax`, `call [rip+x]`).
    public static let indirectBranch = X86InstructionGroups(rawValue: 1 << 5)
    /// A far branch (`ljmp`, `lcall`, `retf`, `iret`).
    public static let farBranch = X86InstructionGroups(rawValue: 1 << 6)
    /// A software interrupt or system call (`int n`, `int3`, `into`, `int1`, `syscall`, `sysenter`).
    public static let interrupt = X86InstructionGroups(rawValue: 1 << 7)
    /// A return from an interrupt or system call (`iret`, `sysret`, `sysexit`).
    public static let interruptReturn = X86InstructionGroups(rawValue: 1 << 8)
    /// Privileged (CPL0 only: `hlt`, `cli`, `mov cr`, `lgdt`, `wrmsr`...).
    public static let privileged = X86InstructionGroups(rawValue: 1 << 9)
    /// Port I/O (`in`, `out`, `ins`, `outs`).
    public static let portIO = X86InstructionGroups(rawValue: 1 << 10)
    /// A string instruction (`movs`, `cmps`, `scas`, `lods`, `stos`, `ins`, `outs`).
    public static let string = X86InstructionGroups(rawValue: 1 << 11)
    /// A string instruction with a `rep`/`repe`/`repne` prefix.
    public static let repeated = X86InstructionGroups(rawValue: 1 << 12)
    /// With a `lock` prefix.
    public static let locked = X86InstructionGroups(rawValue: 1 << 13)
    /// Accesses memory through an explicit memory operand (not `lea`, `nop`, prefetch hints).
    public static let memoryAccess = X86InstructionGroups(rawValue: 1 << 14)
    /// Transactional memory (`xbegin`, `xabort`, `xend`, `xtest`).
    public static let transactional = X86InstructionGroups(rawValue: 1 << 15)
    /// An instruction that always raises #UD (`ud0`, `ud1`, `ud2`).
    public static let undefined = X86InstructionGroups(rawValue: 1 << 16)
    /// A VEX-, EVEX- or XOP-encoded instruction.
    public static let vectorEncoded = X86InstructionGroups(rawValue: 1 << 17)
    /// `hlt`.
    public static let halt = X86InstructionGroups(rawValue: 1 << 18)
}

/// A relative branch: where it goes and where its offset is.
public struct X86RelativeBranch: Hashable, Sendable {
    /// The target address (next instruction + offset, truncated to the operand size).
    public var target: UInt64
    /// The relative offset as encoded.
    public var offset: Int64
    /// The offset's field in the instruction's bytes (1, 2 or 4 bytes).
    public var field: X86Field
}

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

/// Why an instruction could not be decoded.
public enum X86DecodeError: Error, Hashable, Sendable, CustomStringConvertible {
    /// No bytes were given.
    case empty
    /// The bytes end before the instruction does (`needed` is a lower bound).
    case truncated(available: Int, needed: Int)
    /// The bytes are not a valid instruction in this mode.
    case invalid
    /// The encoding is longer than 15 bytes.
    case tooLong
    /// A `66`-prefixed near `call`/`jmp`/`jcc` in 64-bit mode: its length depends on the CPU vendor
    /// (Intel ignores the prefix and reads rel32, AMD reads rel16; Capstone 4.0.2 decodes AMD's form).
    case vendorDependentBranch
    /// Capstone and VMMKit's encoding tables disagree about the length (an unknown Capstone mistake or a table gap).
    case lengthDisagreement(capstone: Int, tables: Int)
    /// Capstone could not be opened (`cs_open` failed with this `cs_err`).
    case capstoneUnavailable(Int)
    /// The vCPU is in compatibility mode (long mode with a 32- or 16-bit code segment): not decoded.
    case compatibilityMode
    /// The code cannot be fetched: the first byte's page walk or read failed.
    case fetch(virtual: UInt64, GuestMemoryError)
    /// The instruction runs into a page whose walk or read failed, after `available` bytes.
    case codeEndsAt(virtual: UInt64, available: Int, GuestMemoryError)

    /// A one-line description.
    public var description: String {
        switch self {
        case .empty: "no bytes to decode"
        case .truncated(let a, let n): "the instruction needs at least \(n) bytes, \(a) available"
        case .invalid: "not a valid instruction"
        case .tooLong: "encoding longer than 15 bytes"
        case .vendorDependentBranch: "66-prefixed near branch in 64-bit mode (length depends on the CPU vendor)"
        case .lengthDisagreement(let c, let t): "Capstone decodes \(c) bytes, the encoding tables \(t)"
        case .capstoneUnavailable(let e): "cs_open failed (cs_err \(e))"
        case .compatibilityMode: "compatibility-mode code is not decoded"
        case .fetch(let v, let e): "cannot fetch code at 0x\(String(v, radix: 16)): \(e)"
        case .codeEndsAt(let v, let a, let e): "code ends at 0x\(String(v, radix: 16)) after \(a) bytes: \(e)"
        }
    }
}

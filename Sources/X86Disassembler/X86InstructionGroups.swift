import VMMKit

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

import VMMKit

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

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

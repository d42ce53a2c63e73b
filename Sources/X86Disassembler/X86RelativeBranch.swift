import VMMKit

/// A relative branch: where it goes and where its offset is.
public struct X86RelativeBranch: Hashable, Sendable {
    /// The target address (next instruction + offset, truncated to the operand size).
    public var target: UInt64
    /// The relative offset as encoded.
    public var offset: Int64
    /// The offset's field in the instruction's bytes (1, 2 or 4 bytes).
    public var field: X86Field
}

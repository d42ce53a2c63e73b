import VMMKit

/// What ``FastPathHarness/check(_:seeds:options:)`` found over its programs.
public struct FastPathCheckResult: Sendable {
    /// The failures (each names its seed and last steps); empty when every program agreed.
    public var failures: [String]
    /// Accesses a fast path served.
    public var served: Int
    /// Accesses that exited.
    public var exited: Int
    /// Reads served from a shared slot.
    public var slotReads: Int
}

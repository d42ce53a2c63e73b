import CKVM

/// A device's record of the fast paths it granted: keep one under the lock
/// that guards the device's state.
///
/// Call ``refresh(_:)`` (still under that lock) after every change that can
/// affect a precondition, before the access or host call returns; it writes
/// every word to match whether its fast path is exact now. Nothing allocates
/// but ``add(_:word:exact:)``.
public struct FastPathGrants: Sendable {
    private var entries: [(description: FastPathDescription, word: FastPathEnableWord)] = []

    /// No grants.
    public init() {}

    /// Whether nothing is granted (then state changes need no refresh).
    @inline(__always)
    public var isEmpty: Bool { entries.isEmpty }

    /// The granted fast paths.
    public var descriptions: [FastPathDescription] { entries.map(\.description) }

    /// Records a grant and writes its word: set when `exact`, clear otherwise.
    /// A word granted again replaces its earlier grant.
    public mutating func add(_ description: FastPathDescription, word: FastPathEnableWord, exact: Bool) {
        entries.removeAll { $0.word == word }
        entries.append((description, word))
        word.store(exact)
    }

    /// Forgets the grant of `word` and clears it.
    public mutating func remove(_ word: FastPathEnableWord) {
        entries.removeAll { $0.word == word }
        word.store(false)
    }

    /// Writes every word: set when `exact` says its fast path is exact now, clear otherwise.
    @inline(__always)
    public func refresh(_ exact: (FastPathDescription) -> Bool) {
        for e in entries { e.word.store(exact(e.description)) }
    }
}

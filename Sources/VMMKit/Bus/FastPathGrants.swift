import CKVM

/// A device's record of the fast paths it granted: keep one under the lock
/// that guards the device's state.
///
/// Call ``refresh(_:)`` (still under that lock) after every change that can
/// affect a precondition, before the access or host call returns; it writes
/// every word to match whether its fast path is exact now. A device that
/// granted shared-slot reads also calls ``storeSlots(_:)`` whenever a slot's
/// register changes (before the refresh). Nothing allocates but the `add` calls.
public struct FastPathGrants: Sendable {
    private var entries: [(description: FastPathDescription, word: FastPathEnableWord, slot: FastPathSlot?)] = []

    /// No grants.
    public init() {}

    /// Whether nothing is granted (then state changes need no refresh).
    @inline(__always)
    public var isEmpty: Bool { entries.isEmpty }

    /// Whether a shared-slot read is granted (``add(_:word:slot:value:exact:)``).
    public private(set) var hasSlots = false

    /// The granted fast paths.
    public var descriptions: [FastPathDescription] { entries.map(\.description) }

    /// Records a grant and writes its word: set when `exact`, clear otherwise.
    /// A word granted again replaces its earlier grant.
    public mutating func add(_ description: FastPathDescription, word: FastPathEnableWord, exact: Bool) {
        insert(description, word: word, slot: nil)
        word.store(exact)
    }

    /// Records a shared-slot read: writes `value` (the register now) into `slot`,
    /// then the word (set when `exact`), so a guest that finds the word set reads a current slot.
    public mutating func add(_ description: FastPathDescription, word: FastPathEnableWord, slot: FastPathSlot,
                             value: UInt64, exact: Bool) {
        insert(description, word: word, slot: slot)
        slot.store(value)
        word.store(exact)
    }

    private mutating func insert(_ description: FastPathDescription, word: FastPathEnableWord, slot: FastPathSlot?) {
        entries.removeAll { $0.word == word }
        entries.append((description, word, slot))
        hasSlots = entries.contains { $0.slot != nil }
    }

    /// Forgets the grant of `word` and clears it; its slot, if any, is never written again.
    public mutating func remove(_ word: FastPathEnableWord) {
        entries.removeAll { $0.word == word }
        hasSlots = entries.contains { $0.slot != nil }
        word.store(false)
    }

    /// Writes every word: set when `exact` says its fast path is exact now, clear otherwise.
    @inline(__always)
    public func refresh(_ exact: (FastPathDescription) -> Bool) {
        for e in entries { e.word.store(exact(e.description)) }
    }

    /// Writes every granted slot with `value` of its description (the register's value now).
    @inline(__always)
    public func storeSlots(_ value: (FastPathDescription) -> UInt64) {
        for e in entries { if let s = e.slot { s.store(value(e.description)) } }
    }

    /// Clears the word of every shared-slot read, then fences: call it before a change the guest
    /// can see in memory ahead of the slot (a completion written to RAM), and ``storeSlots(_:)``
    /// and ``refresh(_:)`` after it. A guest that saw the change then finds the word clear (and
    /// exits to the device, which serves the read under its lock) or set again (and the slot
    /// current): it never pairs the change with the slot's older value.
    public func clearSlotReads() {
        guard hasSlots else { return }
        for e in entries where e.slot != nil { e.word.store(false) }
        ckvm_fence()
    }
}

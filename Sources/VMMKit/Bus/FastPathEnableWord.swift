import CKVM

/// The enable word of one granted fast path: a naturally aligned 32-bit word
/// that the guest's stub reads before it serves the access itself (non-zero:
/// serve it; zero: execute the original instruction, which exits).
///
/// The core defines the handle; DMP supplies the storage (a word in the
/// implant's data page, ``init(memory:at:)``); tests can use host memory
/// (``FastPathEnableWordStorage``). Handles compare equal when they name the
/// same word.
///
/// The device that granted the fast path owns the word's value: it clears
/// the word under its own lock before the access or host call that broke a
/// precondition returns, and sets it only once its state makes the fast
/// path exact again (``FastPathGrants`` does the bookkeeping).
public struct FastPathEnableWord: Hashable, @unchecked Sendable {
    private let pointer: UnsafeMutableRawPointer
    /// Keeps the storage alive (guest memory or host storage).
    private let owner: AnyObject

    /// The word at `address` in guest memory (the implant's data page).
    ///
    /// - Throws: ``GuestMemoryError`` when the word is not 4-byte aligned or not backed by one region.
    public init(memory: GuestMemory, at address: GuestAddress) throws(GuestMemoryError) {
        guard address.rawValue % 4 == 0 else { throw .invalidAddress(address) }
        pointer = try memory.hostPointer(address, length: 4)
        owner = memory
    }

    /// Word `index` of host storage (for tests and host-only users).
    public init(storage: FastPathEnableWordStorage, index: Int) {
        let i = min(max(index, 0), storage.count - 1)
        pointer = storage.base + i * 4
        owner = storage
    }

    /// Whether the word is set (acquire load).
    @inline(__always)
    public var isSet: Bool { ckvm_load_acquire_u32(pointer) != 0 }

    /// Sets or clears the word (release store), skipping the store when the
    /// word already holds the value (a store would take the cache line away
    /// from the vCPUs that read it).
    @inline(__always)
    public func store(_ enabled: Bool) {
        let v: UInt32 = enabled ? 1 : 0
        if ckvm_load_acquire_u32(pointer) != v { ckvm_store_release_u32(pointer, v) }
    }

    /// Same word.
    public static func == (a: Self, b: Self) -> Bool { a.pointer == b.pointer }
    /// Hashes the word's address.
    public func hash(into h: inout Hasher) { h.combine(pointer) }
}

/// Host memory for enable words (tests; VMMs that serve fast paths from host code).
public final class FastPathEnableWordStorage: @unchecked Sendable {
    fileprivate let base: UnsafeMutableRawPointer
    /// The number of words (at least 1).
    public let count: Int

    /// Storage for `count` words, all clear.
    public init(count: Int) {
        self.count = max(1, count)
        base = UnsafeMutableRawPointer.allocate(byteCount: self.count * 4, alignment: 64)
        base.initializeMemory(as: UInt32.self, repeating: 0, count: self.count)
    }

    deinit { base.deallocate() }

    /// Word `index` (clamped to the storage).
    public subscript(index: Int) -> FastPathEnableWord { FastPathEnableWord(storage: self, index: index) }
}

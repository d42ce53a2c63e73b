import CKVM

/// A naturally aligned 8-byte word of guest memory that guest CPUs and host
/// threads use at the same time (a ring slot, a ring header field), accessed
/// only with atomic operations: acquire loads, release stores and a locked
/// compare-and-exchange (`lock cmpxchg`, the guest producers' own instruction).
///
/// Resolve one with ``GuestMemory/sharedWord(at:)`` once and keep it: the
/// access itself is bounds-checked at resolution only. It stays valid as long
/// as the ``GuestMemory`` it came from.
public struct SharedGuestWord: @unchecked Sendable {
    /// The host address of the word.
    let pointer: UnsafeMutableRawPointer

    init(pointer: UnsafeMutableRawPointer) { self.pointer = pointer }

    /// Loads the word with acquire ordering: later reads see what the writer
    /// stored before it published this word with release ordering (or a locked instruction).
    @inline(__always)
    public func load() -> UInt64 { ckvm_load_acquire_u64(pointer) }

    /// Stores the word with release ordering.
    @inline(__always)
    public func store(_ value: UInt64) { ckvm_store_release_u64(pointer, value) }

    /// Replaces the word with `desired` if it holds `expected`, atomically
    /// (sequentially consistent, like the guest's `lock cmpxchg`).
    ///
    /// - Returns: whether it was replaced, and the value it held.
    @inline(__always)
    public func compareExchange(expected: UInt64, desired: UInt64) -> (exchanged: Bool, original: UInt64) {
        var e = expected
        let ok = ckvm_compare_exchange_u64(pointer, &e, desired) != 0
        return (ok, ok ? expected : e)
    }
}

/// A naturally aligned 4-byte word of guest memory the VMM publishes to guest CPUs (a ring header's flags).
struct SharedGuestWord32 {
    let pointer: UnsafeMutableRawPointer
    /// Stores the word with release ordering.
    @inline(__always)
    func store(_ value: UInt32) { ckvm_store_release_u32(pointer, value) }
    /// Loads the word with acquire ordering.
    @inline(__always)
    func load() -> UInt32 { ckvm_load_acquire_u32(pointer) }
}

extension GuestMemory {
    /// The naturally aligned 8-byte word at `address`, for atomic access.
    ///
    /// - Throws: ``GuestMemoryError/misaligned(_:alignment:)`` when `address`
    ///   is not 8-byte aligned, or an address error when it is not backed.
    public func sharedWord(at address: GuestAddress) throws(GuestMemoryError) -> SharedGuestWord {
        guard address.rawValue % 8 == 0 else { throw .misaligned(address, alignment: 8) }
        return SharedGuestWord(pointer: try hostPointer(address, length: 8))
    }

    /// Loads the aligned 64-bit word at `address` with acquire ordering.
    public func loadAcquire(_ type: UInt64.Type, at address: GuestAddress) throws(GuestMemoryError) -> UInt64 {
        try sharedWord(at: address).load()
    }

    /// Stores the aligned 64-bit word at `address` with release ordering.
    public func storeRelease(_ value: UInt64, at address: GuestAddress) throws(GuestMemoryError) {
        try sharedWord(at: address).store(value)
    }

    /// Atomically replaces the aligned 64-bit word at `address` with `desired`
    /// if it holds `expected` (a locked compare-and-exchange).
    ///
    /// - Returns: whether it was replaced, and the value it held.
    public func compareExchange(expected: UInt64, desired: UInt64, at address: GuestAddress) throws(GuestMemoryError) -> (exchanged: Bool, original: UInt64) {
        try sharedWord(at: address).compareExchange(expected: expected, desired: desired)
    }
}

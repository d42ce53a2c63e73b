import CKVM

/// A shared slot: a naturally aligned 64-bit word that a device keeps current
/// with a register's value, so the guest reads the register from it instead of
/// exiting (``FastPathKind/sharedSlotRead(slot:)``).
///
/// The core defines the handle; DMP supplies the storage (a word in the
/// implant's data page, beside the enable word, ``init(memory:at:index:)``);
/// tests can use host memory (``FastPathSlotStorage``). Handles compare equal
/// when they name the same word.
///
/// The slot is *write-only* for the VMM: the guest can write it too, so
/// nothing on the host ever reads it back as the register's value (a guest
/// that scribbles its slot only misleads its own reads, as with enable
/// words). The device writes it under its lock whenever the register changes
/// and when it grants the fast path, before it sets the enable word.
public struct FastPathSlot: Hashable, @unchecked Sendable {
    /// The slot's number, which the device names in ``FastPathKind/sharedSlotRead(slot:)``.
    public let index: Int
    private let pointer: UnsafeMutableRawPointer
    /// Keeps the storage alive (guest memory or host storage).
    private let owner: AnyObject

    /// The 8 bytes at `address` in guest memory (the implant's data page), numbered `index`.
    ///
    /// - Throws: ``GuestMemoryError`` when the word is not 8-byte aligned or not backed by one region.
    public init(memory: GuestMemory, at address: GuestAddress, index: Int) throws(GuestMemoryError) {
        guard address.rawValue % 8 == 0 else { throw .invalidAddress(address) }
        pointer = try memory.hostPointer(address, length: 8)
        owner = memory
        self.index = index
    }

    /// Word `index` of host storage (for tests and host-only users); the slot's number is `index`.
    public init(storage: FastPathSlotStorage, index: Int) {
        let i = min(max(index, 0), storage.count - 1)
        pointer = storage.base + i * 8
        owner = storage
        self.index = i
    }

    /// Writes the register's current value (one 8-byte release store: a guest that sees the value
    /// also sees every store the device made before it, such as completions written to RAM).
    /// Never read back: the guest may have written anything there.
    @inline(__always)
    public func store(_ value: UInt64) { ckvm_store_release_u64(pointer, value) }

    /// Same word.
    public static func == (a: Self, b: Self) -> Bool { a.pointer == b.pointer }
    /// Hashes the word's address.
    public func hash(into h: inout Hasher) { h.combine(pointer) }
}

/// Host memory for shared slots (tests; VMMs that serve fast paths from host code).
public final class FastPathSlotStorage: @unchecked Sendable {
    fileprivate let base: UnsafeMutableRawPointer
    /// The number of slots (at least 1).
    public let count: Int

    /// Storage for `count` slots, all zero.
    public init(count: Int) {
        self.count = max(1, count)
        base = UnsafeMutableRawPointer.allocate(byteCount: self.count * 8, alignment: 64)
        base.initializeMemory(as: UInt64.self, repeating: 0, count: self.count)
    }

    deinit { base.deallocate() }

    /// Slot `index` (clamped to the storage).
    public subscript(index: Int) -> FastPathSlot { FastPathSlot(storage: self, index: index) }

    /// What a guest reading slot `index` sees now (clamped to the storage): for tests and for host code
    /// that serves the read the way a guest would.
    public func load(_ index: Int) -> UInt64 {
        ckvm_load_acquire_u64(base + min(max(index, 0), count - 1) * 8)
    }
}

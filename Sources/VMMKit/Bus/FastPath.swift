import CKVM

/// Whether the guest's producer waits for a ring entry to be applied.
public enum RingAppendMode: Hashable, Sendable {
    /// The device's work is visible to the guest only through exits (UART
    /// output goes to the host): the producer appends and runs on.
    case asynchronous
    /// The device's work is visible to the guest without an exit (completions
    /// written to guest RAM, interrupts): the producer waits, bounded, until
    /// the consumer has applied its entry, and executes the original
    /// instruction when no consumer polls.
    case synchronous
}

/// A counter derived from the TSC (a PM timer, an HPET main counter):
/// `value = ((((tsc × multiplier) >> shift) + offset) & wrapMask`, the
/// product taken at 128 bits.
public struct TSCCounter: Hashable, Sendable {
    /// Multiplies the TSC.
    public var multiplier: UInt64
    /// Shifts the 128-bit product right (0 to 127; larger values count as 127).
    public var shift: UInt8
    /// Added after the shift (the counter's value at TSC 0), wrapping.
    public var offset: UInt64
    /// Applied last: the counter's width (`0xff_ffff` for a 24-bit PM timer, `UInt64.max` for none).
    public var wrapMask: UInt64

    /// Creates a counter description.
    public init(multiplier: UInt64, shift: UInt8, offset: UInt64 = 0, wrapMask: UInt64 = .max) {
        self.multiplier = multiplier; self.shift = shift; self.offset = offset; self.wrapMask = wrapMask
    }

    /// The counter's value at `tsc`: what a stub serving this fast path must return.
    @inline(__always)
    public func value(tsc: UInt64) -> UInt64 {
        let p = tsc.multipliedFullWidth(by: multiplier)
        let s = Int(min(shift, 127))
        let shifted: UInt64
        if s == 0 { shifted = p.low }
        else if s < 64 { shifted = (p.low >> UInt64(s)) | (p.high << UInt64(64 - s)) }
        else { shifted = p.high >> UInt64(s - 64) }
        return (shifted &+ offset) & wrapMask
    }
}

/// How the guest may serve one access to a device register itself, from
/// shared memory, instead of exiting (DESIGN.md, DMP step 3).
///
/// The core only carries these descriptions; the DMP module acts on them.
public enum FastPathKind: Hashable, Sendable {
    /// A read that returns this value while the enable word is set (a status
    /// register, e.g. a UART's "transmitter empty").
    case constantRead(UInt64)
    /// A read of a shared slot that the device keeps current.
    case sharedSlotRead(slot: Int)
    /// A write that has no effect and may be dropped (port 0x80 delays).
    case discardWrite
    /// A write appended to ring `ring` (an index of the paravirtual ring
    /// device) and applied later, in order, by the ring consumer as an
    /// ordinary register write against the device's state at that time.
    case ringAppend(ring: Int, mode: RingAppendMode)
    /// A read of a counter derived from the TSC.
    case tscCounter(TSCCounter)

    /// Whether this kind serves reads (`true`) or writes (`false`).
    public var servesReads: Bool {
        switch self {
        case .constantRead, .sharedSlotRead, .tscCounter: true
        case .discardWrite, .ringAppend: false
        }
    }
}

/// One register access DMP asks a device about: where, how wide, which way,
/// and the ring (if any) whose consumer writes to this register.
public struct FastPathRequest: Hashable, Sendable {
    /// The register's offset in the device's range.
    public var offset: UInt64
    /// The access width in bytes (1, 2, 4 or 8).
    public var size: Int
    /// Read or write.
    public var direction: AccessDirection
    /// The index of a ring whose entries are applied to this register, if one
    /// exists. A device can offer ``FastPathKind/ringAppend(ring:mode:)`` only
    /// for this ring.
    public var ring: Int?

    /// Creates a request.
    public init(offset: UInt64, size: Int, direction: AccessDirection, ring: Int? = nil) {
        self.offset = offset; self.size = size; self.direction = direction; self.ring = ring
    }
}

/// A fast path a device granted for one register access.
public struct FastPathDescription: Hashable, Sendable {
    /// What the guest may do instead of exiting.
    public var kind: FastPathKind
    /// The register's offset in the device's range.
    public var offset: UInt64
    /// The access width in bytes.
    public var size: Int
    /// Read or write.
    public var direction: AccessDirection
    /// For a read: whether it may be served while entries the guest appended
    /// to rings of this device are still pending. When `false` the stub serves
    /// it only while those rings are empty and exits otherwise. Always `false`
    /// for writes.
    public var independentOfPendingRingEntries: Bool

    /// Creates a description.
    public init(kind: FastPathKind, offset: UInt64, size: Int, direction: AccessDirection,
                independentOfPendingRingEntries: Bool = false) {
        self.kind = kind; self.offset = offset; self.size = size; self.direction = direction
        self.independentOfPendingRingEntries = direction == .read && independentOfPendingRingEntries
    }

    /// A description for `request` with `kind`.
    public init(_ kind: FastPathKind, for request: FastPathRequest, independentOfPendingRingEntries: Bool = false) {
        self.init(kind: kind, offset: request.offset, size: request.size, direction: request.direction,
                  independentOfPendingRingEntries: independentOfPendingRingEntries)
    }
}

/// Why the bus did not grant a fast path (``IOBus/grantFastPath(space:address:size:direction:ring:enableWord:)``).
public enum FastPathRefusal: Error, Hashable, Sendable, CustomStringConvertible {
    /// The width is not 1, 2, 4 or 8.
    case unsupportedSize(Int)
    /// No device is attached at the address.
    case unclaimed
    /// The access runs past the end of the device's range.
    case crossesRangeEnd
    /// The register is covered by an ioeventfd or a coalesced zone: the kernel handles it.
    case kernelHandled(KernelHandledKind)
    /// The device offers no fast path for this access (a read with side effects, a write that stops the VM, ...).
    case declined(device: String)
    /// The device answered with a description that does not fit the request
    /// (another offset, width or direction; a read kind for a write; a ring it was not offered).
    case invalidDeclaration(device: String)

    /// A one-line description.
    public var description: String {
        switch self {
        case .unsupportedSize(let s): "no fast path for \(s)-byte accesses"
        case .unclaimed: "no device at that address"
        case .crossesRangeEnd: "the access runs past the end of the device's range"
        case .kernelHandled(let k): "the register is under a \(k.rawValue)"
        case .declined(let d): "device '\(d)' offers no fast path for this access"
        case .invalidDeclaration(let d): "device '\(d)' declared a fast path that does not fit the request"
        }
    }
}

/// An address range whose accesses the kernel handles without an exit.
public enum KernelHandledKind: String, Hashable, Sendable {
    /// `KVM_IOEVENTFD`: writes signal an eventfd.
    case ioeventfd
    /// `KVM_REGISTER_COALESCED_MMIO`: writes are batched in a kernel ring.
    case coalescedZone = "coalesced zone"
}

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

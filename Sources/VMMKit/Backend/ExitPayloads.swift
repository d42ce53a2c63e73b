/// The direction of a device access, seen from the guest.
public enum AccessDirection: UInt8, Hashable, Sendable {
    /// The guest reads from the device (`in`, an MMIO load).
    case read
    /// The guest writes to the device (`out`, an MMIO store).
    case write
}

/// A port I/O exit (`KVM_EXIT_IO`).
///
/// For `count > 1` (string I/O: `rep insb`/`rep outsw`...) the data holds
/// `count` elements of `size` bytes; read them with ``ExitContext/ioData(at:)``
/// and, for reads, supply each with ``ExitContext/completeRead(_:at:)``.
public struct PortIO: Hashable, Sendable {
    /// The I/O port.
    public var port: UInt16
    /// The access width in bytes (1, 2 or 4).
    public var size: UInt8
    /// The number of elements (more than 1 for string I/O).
    public var count: UInt32
    /// In or out.
    public var direction: AccessDirection
    /// For an `out` with `count == 1`, the value written (zero-extended); zero otherwise.
    public var value: UInt64

    /// Creates a port I/O exit description.
    public init(port: UInt16, size: UInt8, count: UInt32 = 1, direction: AccessDirection, value: UInt64 = 0) {
        self.port = port; self.size = size; self.count = count; self.direction = direction; self.value = value
    }
}

/// An MMIO exit (`KVM_EXIT_MMIO`): a guest load or store to guest-physical
/// memory that no writable memory slot backs.
public struct MMIOAccess: Hashable, Sendable {
    /// The guest-physical address accessed.
    public var address: GuestAddress
    /// The access width in bytes (1 to 8).
    public var size: UInt8
    /// Load or store.
    public var direction: AccessDirection
    /// For a store, the value written (little-endian, zero-extended); zero for a load.
    public var value: UInt64

    /// Creates an MMIO exit description.
    public init(address: GuestAddress, size: UInt8, direction: AccessDirection, value: UInt64 = 0) {
        self.address = address; self.size = size; self.direction = direction; self.value = value
    }
}

/// Why the hypervisor could not run or emulate guest code (`KVM_EXIT_INTERNAL_ERROR`).
///
/// The first data words are stored inline (up to ``capacity``), so the exit
/// carries no reference-counted payload and decoding it allocates nothing. All
/// of them (up to 16) can be read with ``ExitContext/ioData(at:)``.
public struct InternalError: Hashable, Sendable {
    /// `KVM_INTERNAL_ERROR_*`: 1 = emulation failure, 2 = simultaneous exceptions, 3 = delivery event, 4 = unexpected exit.
    public var suberror: UInt32
    /// The extra words the kernel reported, inline (at most ``capacity``).
    public var words: ExitWords

    /// How many data words an internal error keeps inline (`kvm_run.internal.data` holds
    /// up to 16: read the rest with ``ExitContext/ioData(at:)``). An emulation failure's first three
    /// words hold its flags, then its instruction length and up to 15 instruction bytes (16 bytes).
    public static let capacity = ExitWords.capacity

    /// Creates an internal-error description; words beyond ``capacity`` are dropped.
    public init(suberror: UInt32, data: [UInt64] = []) { self.suberror = suberror; self.words = ExitWords(data) }

    /// Creates an internal-error description from inline words.
    public init(suberror: UInt32, words: ExitWords) { self.suberror = suberror; self.words = words }

    /// The extra words as an array (allocates: for diagnostics, not the exit path).
    public var data: [UInt64] { Array(words) }

    /// Whether this is an instruction emulation failure.
    public var isEmulationFailure: Bool { suberror == 1 }
}

/// Up to 6 64-bit words stored inline: the data of an exit (hypercall
/// arguments, the first internal-error words) without a heap allocation, and
/// small enough that an exit is copied with a few moves.
public struct ExitWords: RandomAccessCollection, Hashable, Sendable, CustomStringConvertible {
    /// The most words a value holds.
    public static let capacity = 6
    private var storage: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0)
    private var held: UInt8 = 0
    /// The number of words held.
    public var count: Int { Int(held) }

    /// No words.
    public init() {}

    /// The first ``capacity`` words of `words`.
    public init<S: Sequence<UInt64>>(_ words: S) {
        for w in words where count < ExitWords.capacity { append(w) }
    }

    /// The first `count` 8-byte words of `bytes` (at most ``capacity``, at most what `bytes` holds).
    @inline(__always)
    init(loading bytes: UnsafeRawBufferPointer, count n: Int) {
        let n = Swift.min(Swift.max(n, 0), ExitWords.capacity, bytes.count / 8)
        withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[0..<(n * 8)])) }
        held = UInt8(n)
    }

    /// Appends a word (ignored when full).
    public mutating func append(_ word: UInt64) {
        guard count < ExitWords.capacity else { return }
        let i = count
        withUnsafeMutableBytes(of: &storage) { $0.storeBytes(of: word, toByteOffset: i * 8, as: UInt64.self) }
        held += 1
    }

    /// 0.
    public var startIndex: Int { 0 }
    /// ``count``.
    public var endIndex: Int { count }
    /// Word `i` (`0..<count`; other indices read as 0).
    public subscript(i: Int) -> UInt64 {
        guard i >= 0, i < count else { return 0 }
        return withUnsafeBytes(of: storage) { $0.load(fromByteOffset: i * 8, as: UInt64.self) }
    }

    /// Equal when the held words are equal.
    public static func == (a: ExitWords, b: ExitWords) -> Bool { a.elementsEqual(b) }
    /// Hashes the held words.
    public func hash(into h: inout Hasher) {
        h.combine(count)
        for w in self { h.combine(w) }
    }
    /// `[w0, w1, ...]` in hex.
    public var description: String { "[" + map { "0x" + String($0, radix: 16) }.joined(separator: ", ") + "]" }
}

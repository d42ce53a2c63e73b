/// The shared-memory layout of one paravirtual ring (version 2), the contract
/// between guest producers (static-PV guests, DMP's stubs) and the VMM's
/// consumer (``PVRingDevice``). All fields are little-endian.
///
/// Header (the ring's first 128 bytes):
///
/// | offset | size | field | written by |
/// |---|---|---|---|
/// | `+0` | 8 | producer *hint*: the next position to claim (free-running) | guest producers (untrusted) |
/// | `+8` | 4 | magic ``magic`` (`"RNG2"`) | VMM |
/// | `+12` | 4 | slot count (a power of two, ≥ 2) | VMM |
/// | `+16` | 4 | value width in bytes (1, 2 or 4) | VMM |
/// | `+20` | 4 | flags: ``pollingFlag``, ``synchronousFlag`` | VMM |
/// | `+64` | 8 | consumer index: every position below it is applied (free-running) | VMM only |
///
/// Slots follow at ``slotsOffset``: one 8-byte-aligned word per slot, the
/// 32-bit *sequence* in its low half and the 32-bit *value* in its high half.
/// The slot for position `p` (index `p & (count - 1)`) is **free** when its
/// sequence is `p` (mod 2³²) and **published** when it is `p + 1`. A producer
/// claims and publishes a free slot with one 8-byte `lock cmpxchg` to
/// `(p + 1, value)`; the consumer frees a consumed slot by storing
/// `(p + count, 0)`. No reserved-but-unpublished state exists, so a producer
/// stopped at any instruction cannot block the ring.
public enum PVRingLayout {
    /// The header magic, `"RNG2"` (v1 rings had `"RING"` at `+12`; a v1 guest finds no ring and refuses to run).
    public static let magic: UInt32 = 0x3247_4E52
    /// Offset of the 64-bit producer hint.
    public static let hintOffset: UInt64 = 0
    /// Offset of the 32-bit magic.
    public static let magicOffset: UInt64 = 8
    /// Offset of the 32-bit slot count.
    public static let slotCountOffset: UInt64 = 12
    /// Offset of the 32-bit value width.
    public static let widthOffset: UInt64 = 16
    /// Offset of the 32-bit flags.
    public static let flagsOffset: UInt64 = 20
    /// Offset of the 64-bit consumer index (its own cache line: the guest writes the hint's).
    public static let consumerOffset: UInt64 = 64
    /// Offset of the first slot.
    public static let slotsOffset: UInt64 = 128
    /// Bytes per slot.
    public static let slotSize: UInt64 = 8
    /// The default distance between ring headers (room for up to 1008 slots, so 512 as a power of two).
    public static let defaultStride: UInt64 = 0x2000
    /// Flag: a consumer is polling the ring now. A producer that finds the ring
    /// full may wait (bounded) for it; a synchronous producer appends only while it is set.
    public static let pollingFlag: UInt32 = 1
    /// Flag: the ring is synchronous: a producer waits (bounded) until the
    /// consumer index passes its position, because the device's work is
    /// visible to the guest without an exit (completions written to RAM).
    public static let synchronousFlag: UInt32 = 2

    /// The slot word holding `sequence` and `value`.
    @inline(__always)
    public static func slotWord(sequence: UInt32, value: UInt32) -> UInt64 {
        UInt64(value) << 32 | UInt64(sequence)
    }

    /// The sequence half of a slot word.
    @inline(__always)
    public static func sequence(of word: UInt64) -> UInt32 { UInt32(truncatingIfNeeded: word) }

    /// The value half of a slot word.
    @inline(__always)
    public static func value(of word: UInt64) -> UInt32 { UInt32(truncatingIfNeeded: word >> 32) }
}

/// Errors from setting up the paravirtual rings. Guest-written ring words
/// never cause one: the consumer treats any value as data to skip or wait for.
public enum PVRingError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The ring's memory is not backed by guest memory.
    case memory(GuestMemoryError)
    /// The ring layout does not fit in the paravirtual area, or a target is malformed.
    case layout(String)

    /// A one-line description.
    public var description: String {
        switch self {
        case .memory(let e): "paravirtual ring memory: \(e)"
        case .layout(let s): "paravirtual ring layout: \(s)"
        }
    }
}

/// The device register a ring's entries are written to, and how.
public struct PVRingTarget: Hashable, Sendable {
    /// Port I/O or MMIO.
    public var space: BusSpace
    /// The port or guest-physical address.
    public var address: UInt64
    /// The value width in bytes (1, 2 or 4): each entry is written as an access of this size, its value masked to it.
    public var width: Int
    /// Whether appends are synchronous (the producer waits until its entry is
    /// applied: the device's work is visible without an exit, like the
    /// doorbell's completions in RAM) or asynchronous (UART output).
    public var synchronous: Bool

    /// Creates a target.
    public init(space: BusSpace, address: UInt64, width: Int = 1, synchronous: Bool = false) {
        self.space = space; self.address = address; self.width = width; self.synchronous = synchronous
    }
}

/// Whether the ring consumer polls, and for how long it keeps polling after
/// the last entry (the model is io_uring's SQPOLL thread and its `sq_thread_idle`).
public struct PVRingPolling: Hashable, Sendable {
    /// Whether a polling thread runs beside the vCPUs.
    public var enabled: Bool
    /// How long the poller keeps polling after it last found an entry before it sleeps.
    public var idleNanoseconds: UInt64
    /// Spin-wait hints (`pause`) between two looks at the rings (at least 1):
    /// larger values let entries arrive in longer runs (fewer cache-line
    /// transfers between producer and poller) and add that much latency to a
    /// synchronous append.
    public var spinsBetweenChecks: Int

    /// No polling thread: rings drain before exits, at stop and from the drain timer.
    public static let disabled = PVRingPolling(enabled: false, idleNanoseconds: 0)
    /// A polling thread that sleeps after `idleNanoseconds` without entries (default 2 ms).
    public static func enabled(idleNanoseconds: UInt64 = 2_000_000, spinsBetweenChecks: Int = 16) -> PVRingPolling {
        PVRingPolling(enabled: true, idleNanoseconds: idleNanoseconds, spinsBetweenChecks: spinsBetweenChecks)
    }

    /// Creates a configuration.
    public init(enabled: Bool, idleNanoseconds: UInt64, spinsBetweenChecks: Int = 16) {
        self.enabled = enabled; self.idleNanoseconds = idleNanoseconds; self.spinsBetweenChecks = spinsBetweenChecks
    }
}

/// Counters of one ring (``PVRingDevice/statistics(ring:)``).
public struct PVRingStatistics: Hashable, Sendable {
    /// Entries applied to the target device.
    public var consumed: Int = 0
    /// Batches handed to the device.
    public var batches: Int = 0
    /// Holes healed: free slots skipped because the producer hint was already past them.
    public var holes: Int = 0
    /// Times a drain found a free slot at the consumer index with the hint more
    /// than a ring ahead (a hostile or broken producer): nothing is skipped then.
    public var invalidHints: Int = 0
}

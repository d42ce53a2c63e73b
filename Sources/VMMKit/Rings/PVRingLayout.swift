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
/// | `+20` | 4 | flags: ``pollingFlag``, ``synchronousFlag``, ``wakeFlag`` | VMM |
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
    /// Flag: a consumer is polling the ring now (or was just woken and is about
    /// to: the VMM raises it when it wakes the consumer). A producer that finds the ring
    /// full may wait (bounded) for it; a synchronous producer appends only while it is set.
    public static let pollingFlag: UInt32 = 1
    /// Flag: the ring is synchronous: a producer waits (bounded) until the
    /// consumer index passes its position, because the device's work is
    /// visible to the guest without an exit (completions written to RAM).
    public static let synchronousFlag: UInt32 = 2
    /// Flag: the ring's polling consumer sleeps (it went idle). A producer
    /// that published an entry while it is set writes the kick register (an
    /// exit: the VMM applies the entry and wakes the consumer), so a producer
    /// that starts again after a pause never fills the ring waiting for the
    /// consumer's timer (io_uring's `IORING_SQ_NEED_WAKEUP`). Clear when no
    /// consumer polls at all (then entries wait for the next exit or the drain
    /// timer) and while it polls (``pollingFlag``). The VMM clears it when it
    /// wakes the consumer, so one kick is enough.
    public static let wakeFlag: UInt32 = 4

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

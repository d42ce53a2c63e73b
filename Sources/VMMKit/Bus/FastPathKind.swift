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

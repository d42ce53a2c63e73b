import VMMKit

/// A Swift model of the guest's ring producer (`Guests/include/ring.inc`,
/// ``PVRingLayout``), one shared-memory access per step, so a test can stop a
/// producer between any two of its steps and check that the ring still
/// drains; benchmarks use it as a host producer thread.
///
/// A producer is used by one thread at a time; several producers may share a ring.
public final class RingProducerModel: @unchecked Sendable {
    /// What a push came to.
    public enum Outcome: Hashable, Sendable {
        /// The value is in the ring (on a synchronous ring: applied by the consumer).
        case published
        /// The caller must perform the original device access (ring full with no
        /// consumer polling, bound reached, or synchronous with no consumer polling).
        case fallback
        /// Published, and the caller kicks (writes the kick register: an exit)
        /// instead of repeating the access: the ring's polling consumer sleeps
        /// (``PVRingLayout/wakeFlag``), or on a synchronous ring the consumer
        /// did not apply the entry within the bound.
        case kick
    }

    /// The producer's steps, in the order of `ring.inc`; each touches shared memory at most once.
    public enum Step: Hashable, Sendable {
        case readFlags, readHint, readSlot, claim, moveHint, readWakeFlag, helpHint, readConsumer
    }

    /// Attempts per push (and full-ring waits while a consumer polls), as `RING_TRIES`.
    public static let tries = 4096
    /// Polls of the consumer index on a synchronous ring, as `RING_SYNC_WAIT`.
    public static let syncWait = 1 << 16

    private let hint: SharedGuestWord
    private let consumer: SharedGuestWord
    private let flagsWord: SharedGuestWord
    private let slots: [SharedGuestWord]
    private let count: UInt64

    private var current: Step = .readFlags
    private var value: UInt32 = 0
    private var p: UInt64 = 0
    private var word: UInt64 = 0
    private var left = 0
    private var synchronous = false
    /// The outcome of the last finished push.
    public private(set) var outcome: Outcome?
    /// Full-ring fallbacks so far (the ring was full and no consumer polled, or the wait ran out).
    public private(set) var fullFallbacks = 0
    /// Whether the ring was seen full at least once in the current or last push.
    private var sawFull = false

    /// A producer for the ring whose header is at `header` in `memory`
    /// (the slot count is read from the header once, as the guest trusts the VMM's header).
    public init(memory: GuestMemory, header: GuestAddress) throws(GuestMemoryError) {
        hint = try memory.sharedWord(at: GuestAddress(header.rawValue + PVRingLayout.hintOffset))
        consumer = try memory.sharedWord(at: GuestAddress(header.rawValue + PVRingLayout.consumerOffset))
        // +16: width (low half), flags (high half).
        flagsWord = try memory.sharedWord(at: GuestAddress(header.rawValue + PVRingLayout.widthOffset))
        let n: UInt32 = try memory.read(at: GuestAddress(header.rawValue + PVRingLayout.slotCountOffset))
        guard n >= 2, n & (n - 1) == 0, n <= 1 << 20 else { throw .invalidRegion("ring slot count \(n) in the header") }
        count = UInt64(n)
        var s: [SharedGuestWord] = []
        for i in 0..<count {
            s.append(try memory.sharedWord(at: GuestAddress(header.rawValue + PVRingLayout.slotsOffset + i * PVRingLayout.slotSize)))
        }
        slots = s
    }

    /// Whether a push is in progress (started and not finished).
    public private(set) var inProgress = false

    /// The step the producer performs next.
    public var nextStep: Step { current }

    /// Starts pushing `value`; run it with ``step()`` or ``finish()``.
    public func begin(_ value: UInt32) {
        self.value = value
        current = .readFlags
        left = RingProducerModel.tries
        outcome = nil
        sawFull = false
        inProgress = true
    }

    private var flags: UInt32 { UInt32(truncatingIfNeeded: flagsWord.load() >> 32) }

    /// Performs one step. Returns false once the push has finished (``outcome`` is set).
    @discardableResult
    public func step() -> Bool {
        guard inProgress else { return false }
        switch current {
        case .readFlags:
            let f = flags & (PVRingLayout.pollingFlag | PVRingLayout.synchronousFlag)
            synchronous = f & PVRingLayout.synchronousFlag != 0
            if f == PVRingLayout.synchronousFlag { return finish(.fallback) }
            current = .readHint
        case .readHint:
            p = hint.load()
            current = .readSlot
        case .readSlot:
            word = slots[Int(p & (count - 1))].load()
            let seq = PVRingLayout.sequence(of: word)
            let p32 = UInt32(truncatingIfNeeded: p)
            if seq == p32 { current = .claim }
            else if seq == p32 &+ 1 || seq == p32 &+ UInt32(truncatingIfNeeded: count) { current = .helpHint }
            else if seq == p32 &+ 1 &- UInt32(truncatingIfNeeded: count) {
                sawFull = true
                if flags & PVRingLayout.pollingFlag == 0 { fullFallbacks += 1; return finish(.fallback) }
                return retry()
            } else { return retry() }
        case .claim:
            let new = PVRingLayout.slotWord(sequence: UInt32(truncatingIfNeeded: p &+ 1), value: value)
            guard slots[Int(p & (count - 1))].compareExchange(expected: word, desired: new).exchanged else { return retry() }
            current = .moveHint
        case .moveHint:
            _ = hint.compareExchange(expected: p, desired: p &+ 1)
            current = .readWakeFlag
        case .readWakeFlag:
            if flags & PVRingLayout.wakeFlag != 0 { return finish(.kick) }
            guard synchronous else { return finish(.published) }
            left = RingProducerModel.syncWait
            current = .readConsumer
        case .helpHint:
            _ = hint.compareExchange(expected: p, desired: p &+ 1)
            return retry()
        case .readConsumer:
            if Int64(bitPattern: consumer.load() &- p) > 0 { return finish(.published) }
            left -= 1
            if left <= 0 { return finish(.kick) }
        }
        return true
    }

    private func retry() -> Bool {
        left -= 1
        if left <= 0 {
            if sawFull { fullFallbacks += 1 }
            return finish(.fallback)
        }
        current = .readHint
        return true
    }

    private func finish(_ o: Outcome) -> Bool {
        outcome = o
        inProgress = false
        return false
    }

    /// Runs the current push to its end and returns its outcome.
    @discardableResult
    public func finish() -> Outcome {
        while step() {}
        return outcome ?? .fallback
    }

    /// Pushes `value` from start to end.
    @discardableResult
    public func push(_ value: UInt32) -> Outcome {
        begin(value)
        return finish()
    }
}

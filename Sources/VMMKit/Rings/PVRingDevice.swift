import Synchronization

/// The paravirtual ring device: shared-memory rings (``PVRingLayout``) through
/// which a guest posts device writes without exiting, consumed by the VMM. It
/// serves the hand-paravirtualized (static-PV) guests, and DMP's stubs use the
/// same layout. A ring is identified by its index (``ring(for:)``); ring `i`'s
/// header is at `base + i * stride`.
///
/// The consumer reads each slot with one 64-bit load, applies published slots
/// in order, hands each run to the target device as a batch
/// (``BusDevice/writeBatch(offset:size:values:)``), and only then frees the
/// slots and publishes its index (release store). A free slot at the consumer
/// index while the producer hint is already past it is a *hole* (a producer
/// reordered its hint update, or a guest wrote the hint): the consumer skips it
/// with a compare-and-exchange, so a producer about to claim it fails and
/// retries, and counts it. Every guest-written word is checked before use;
/// every loop is bounded.
///
/// Ordering: the VMM handles every exit only after the entries published
/// before it. Before each exit the device runs a lock-free check (the slot at
/// the consumer index published, the hint past the consumer, or a drain in
/// progress) and, when it fires, takes the ring lock and drains, which waits
/// for a drain in progress on another thread. It also drains at stop, from the
/// drain timer (``StandardDevices`` adds it) and, with ``PVRingPolling`` on,
/// from a polling thread. No entry is applied after one that stopped the VM.
public final class PVRingDevice: ExitHandler, @unchecked Sendable {
    /// The distance between ring headers.
    public let stride: UInt64
    /// How often ``StandardDevices`` drains the rings from the timer while vCPUs run without exiting (10 ms).
    public static let drainInterval: UInt64 = 10_000_000
    /// The most entries the consumer hands to a device (and frees) at once. A producer sees the slots of a
    /// batch in progress as full until the device has taken the whole batch, so batches as long as a large ring
    /// would keep it full for as long as the device needs for them (a UART taking 32,768 bytes).
    public static let maximumBatch: UInt64 = 512

    /// Where ring 0's header is.
    public let base: GuestAddress
    /// Each ring's target, by ring index.
    public let targets: [PVRingTarget]
    /// Slots per ring (the VMM's copy; the guest's copy in the header is not trusted).
    public let slotCount: UInt32
    /// Whether a polling consumer runs while the VM runs.
    public let polling: PVRingPolling

    private let rings: [Ring]
    /// ``rings`` unretained (``rings`` keeps them alive), for the lock-free check.
    private let ringRefs: UnsafeMutableBufferPointer<Unmanaged<Ring>>
    let lock = ConditionLock()
    /// Odd while a drain is in progress (the lock-free check's seqlock).
    private let generation = Atomic<UInt64>(0)
    /// Set when an applied entry stopped the VM: nothing more is applied until the stop is done.
    private var stoppedByEntry = false
    /// Whether any ring has carried an entry: until one has, a write to a
    /// target register is the guest using the device directly, not a
    /// producer's fallback, and does not wake the poller (a guest without
    /// rings would otherwise keep it polling on every such write).
    private let carriedEntries = Atomic<Bool>(false)
    /// Set by ``producersDetached()`` while entries were still pending: the drain that empties the rings
    /// clears ``carriedEntries`` (lock held).
    private var detachAfterDrain = false
    let poller = PollerState()

    /// Creates the rings and writes their headers. The rings occupy
    /// `[base, base + targets.count * stride)`, which must lie inside `area`
    /// and in one region of `memory`.
    ///
    /// - Parameters:
    ///   - slotCount: slots per ring, a power of two ≥ 2 that fits `stride`.
    ///   - polling: whether ``attach(to:)`` starts a polling consumer.
    public init(memory: GuestMemory, bus: IOBus, base: GuestAddress = X86Layout.ringArea.start,
                area: GuestRange = X86Layout.ringArea, stride: UInt64 = PVRingLayout.defaultStride,
                targets: [PVRingTarget], slotCount: UInt32 = 512,
                polling: PVRingPolling = .disabled) throws(PVRingError) {
        let (span, o) = UInt64(targets.count).multipliedReportingOverflow(by: stride)
        guard !o, base.rawValue % 4096 == 0, stride % 4096 == 0, area.contains(base, length: span) else {
            throw .layout("\(targets.count) rings of \(stride) bytes at \(base) do not fit in \(area) (page aligned)")
        }
        guard slotCount >= 2, slotCount & (slotCount - 1) == 0,
              PVRingLayout.slotsOffset + UInt64(slotCount) * PVRingLayout.slotSize <= stride else {
            throw .layout("slot count \(slotCount) must be a power of two ≥ 2 that fits \(stride) bytes")
        }
        for t in targets where ![1, 2, 4].contains(t.width) {
            throw .layout("target \(t.space) 0x\(String(t.address, radix: 16)) has width \(t.width); ring values are 1, 2 or 4 bytes")
        }
        self.base = base
        self.stride = stride
        self.targets = targets
        self.slotCount = slotCount
        self.polling = polling
        var rings: [Ring] = []
        for (i, t) in targets.enumerated() {
            let h = GuestAddress(base.rawValue + UInt64(i) * stride)
            do throws(GuestMemoryError) {
                try memory.fill(0, at: h, count: Int(stride))
                // One region holds the whole ring: resolve its host address once.
                let first = try memory.sharedWord(at: h)
                guard memory.isValid(h, length: stride) else { throw GuestMemoryError.partialBuffer(expected: Int(stride), completed: 0) }
                try memory.write(PVRingLayout.magic, at: GuestAddress(h.rawValue + PVRingLayout.magicOffset))
                try memory.write(slotCount, at: GuestAddress(h.rawValue + PVRingLayout.slotCountOffset))
                try memory.write(UInt32(t.width), at: GuestAddress(h.rawValue + PVRingLayout.widthOffset))
                try memory.write(t.synchronous ? PVRingLayout.synchronousFlag : 0, at: GuestAddress(h.rawValue + PVRingLayout.flagsOffset))
                rings.append(Ring(index: i, target: t, header: h, host: first.pointer, count: UInt64(slotCount)))
            } catch { throw .memory(error) }
        }
        self.rings = rings
        ringRefs = .allocate(capacity: rings.count)
        _ = ringRefs.initialize(from: rings.map { Unmanaged.passUnretained($0) })
        self.bus = bus
    }

    deinit { ringRefs.deallocate() }

    private let bus: IOBus

    /// The guest-physical address of ring `index`'s header.
    public func header(_ index: Int) -> GuestAddress {
        GuestAddress(base.rawValue + UInt64(index) * stride)
    }

    /// The index of the ring whose entries go to `space`/`address`, if any
    /// (the identity a fast path's ring append names).
    public func ring(for space: BusSpace, address: UInt64) -> Int? {
        targets.firstIndex { $0.space == space && $0.address == address }
    }

    /// The consumer index of ring `index`: every position below it has been
    /// applied. A synchronous producer that appended at position `p` waits
    /// until this (the header's `+64` word) is greater than `p`.
    /// (0 for an index that names no ring.)
    public func consumerIndex(ring index: Int) -> UInt64 {
        guard rings.indices.contains(index) else { return 0 }
        return rings[index].shadow.load(ordering: .acquiring)
    }

    /// Counters of ring `index` (zeros for an index that names no ring).
    public func statistics(ring index: Int) -> PVRingStatistics {
        guard rings.indices.contains(index) else { return PVRingStatistics() }
        return lock.withLock { rings[index].stats }
    }

    /// Entries consumed per ring.
    public var consumed: [Int] { lock.withLock { rings.map(\.stats.consumed) } }

    /// Holes healed per ring.
    public var holes: [Int] { lock.withLock { rings.map(\.stats.holes) } }

    // MARK: draining

    /// Consumes every published slot of every ring, in order, writing each run
    /// to its target device through the bus in one batch. Returns a stop
    /// reason if an entry stopped the VM (no later entry is applied then).
    /// Safe from any thread; drains are serialized.
    ///
    /// - Parameter wakePoller: when entries were found, wake a sleeping
    ///   poller too (the drain timer does: a guest is producing again).
    @discardableResult
    public func drain(wakePoller: Bool = false) -> StopReason? {
        lock.lock()
        let (stop, n) = drainLocked()
        lock.unlock()
        if wakePoller && n > 0 { wakeSleepingPoller() }
        return stop
    }

    /// Whether a drain could find work: lock-free, allocation-free, a few
    /// loads per ring. False means every entry published before the call was
    /// already applied.
    @inline(__always)
    public func hasPending() -> Bool {
        let g = generation.load(ordering: .acquiring)
        if g & 1 != 0 { return true }
        // Through the unretained buffer: no reference counting on the exit path.
        for i in 0..<ringRefs.count where ringRefs[i]._withUnsafeGuaranteedRef({ $0.mayHaveEntries }) { return true }
        return generation.load(ordering: .acquiring) != g
    }

    func drainLocked() -> (stop: StopReason?, applied: Int) {
        if stoppedByEntry { return (nil, 0) }
        generation.wrappingAdd(1, ordering: .sequentiallyConsistent)
        defer { generation.wrappingAdd(1, ordering: .releasing) }
        var total = 0
        for r in rings {
            let (stop, n) = drainRing(r)
            total += n
            if n > 0 && !carriedEntries.load(ordering: .relaxed) { carriedEntries.store(true, ordering: .relaxed) }
            if let stop {
                stoppedByEntry = true
                return (stop, total)
            }
        }
        if detachAfterDrain && !rings.contains(where: { $0.mayHaveEntries }) {
            detachAfterDrain = false
            carriedEntries.store(false, ordering: .relaxed)
        }
        return (nil, total)
    }

    /// Drains one ring, lock held: up to two rings' worth of positions, so a
    /// producer that keeps producing cannot keep it here.
    private func drainRing(_ r: Ring) -> (StopReason?, Int) {
        var budget = 2 * r.count
        var applied = 0
        while budget > 0 {
            let c = r.consumer
            // Collect the run of published slots at c, c+1, ...
            var n: UInt64 = 0
            let limit = min(budget, r.count, PVRingDevice.maximumBatch)
            while n < limit {
                let w = r.slot(c &+ n).load()
                guard PVRingLayout.sequence(of: w) == UInt32(truncatingIfNeeded: c &+ n &+ 1) else { break }
                r.values[Int(n)] = UInt64(PVRingLayout.value(of: w)) & r.valueMask
                n += 1
            }
            if n > 0 {
                let t = r.target
                let result = bus.writeBatch(t.space, address: t.address, size: t.width,
                                            values: UnsafeBufferPointer(start: r.values, count: Int(n)))
                // Unclaimed writes are dropped (the PC convention): the whole run is done.
                let done = UInt64(result?.applied ?? Int(n))
                r.release(from: c, count: done)
                r.stats.consumed += Int(done)
                r.stats.batches += 1
                applied += Int(done)
                budget -= done
                if case .stopVM(let s)? = result?.effect { return (.guestExit(status: s), applied) }
                if done < n { break } // a device that took less than it was given: the rest waits
                continue
            }
            // Nothing published at c: a hole if the slot is free and the hint is past it.
            let w = r.slot(c).load()
            guard PVRingLayout.sequence(of: w) == UInt32(truncatingIfNeeded: c) else { break }
            let ahead = r.hint.load() &- c
            if ahead == 0 || Int64(bitPattern: ahead) < 0 { break } // caught up, or a stale hint behind
            guard ahead <= r.count else { r.stats.invalidHints += 1; break }
            let freed = PVRingLayout.slotWord(sequence: UInt32(truncatingIfNeeded: c &+ r.count), value: 0)
            if r.slot(c).compareExchange(expected: w, desired: freed).exchanged {
                r.stats.holes += 1
                r.advance(to: c &+ 1)
            }
            // Otherwise a producer claimed it just now: look again.
            budget -= 1
        }
        return (nil, applied)
    }

    // MARK: exit chain

    /// Drains the rings before any exit is handled (when the lock-free check
    /// says there may be entries), then passes the exit on. A write exit to a
    /// ring's target register (a producer's fallback) wakes a sleeping poller,
    /// once the rings have carried entries. Such a write, or entries drained
    /// here, show a producer at work: the poller's idle period starts again
    /// (it may have been off its CPU while the exits drained for it).
    public func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
        if hasPending() {
            lock.lock()
            // The lock-free check also says yes while the poller drains empty rings: a write then is a fallback
            // only if the rings hold entries or have carried some (or a producer attached).
            if let i = ringOfTargetWrite(exit), carriedEntries.load(ordering: .relaxed) || rings.contains(where: { $0.mayHaveEntries }) {
                countFallback(rings[i])
            }
            let (stop, n) = drainLocked()
            lock.unlock()
            if let stop { return .stopVM(stop) }
            if n > 0 { poller.noteActivity() }
            wakeSleepingPoller()
        } else if carriedEntries.load(ordering: .relaxed), let i = ringOfTargetWrite(exit) {
            lock.withLock { countFallback(rings[i]) }
            poller.noteActivity()
            if poller.isSleeping { wakeSleepingPoller() }
        }
        return .pass
    }

    /// The index of the ring whose target register `exit` writes, if any.
    @inline(__always)
    private func ringOfTargetWrite(_ exit: VMExit) -> Int? {
        switch exit {
        case .io(let io) where io.direction == .write:
            return targets.firstIndex { $0.space == .pio && $0.address == UInt64(io.port) }
        case .mmio(let m) where m.direction == .write:
            return targets.firstIndex { $0.space == .mmio && $0.address == m.address.rawValue }
        default:
            return nil
        }
    }

    /// Counts a producer's fallback on ring `r` by the state it found (lock held, before the drain): the
    /// ring full, or the polling consumer idle. Called while entries are pending, or once the rings have
    /// carried entries: before that, a write is the guest using the device directly, not a fallback.
    private func countFallback(_ r: Ring) {
        r.stats.fallbacks += 1
        if r.hint.load() &- r.consumer >= r.count {
            r.stats.fallbacksRingFull += 1
        } else if polling.enabled && !poller.polling.load(ordering: .relaxed) || poller.isSleeping {
            r.stats.fallbacksConsumerIdle += 1
        }
    }

    /// Drains what the guest published before it stopped, unless an entry
    /// stopped the VM (then the entries after it stay unapplied).
    public func vmDidStop(_ vm: VirtualMachine) throws(VMError) {
        lock.lock(); defer { lock.unlock() }
        if stoppedByEntry { stoppedByEntry = false; return }
        _ = drainLocked()
        stoppedByEntry = false
    }

    /// Adds the device to `vm`: its exit handler and, when ``polling`` is on,
    /// the polling thread (started and stopped with the VM).
    public func attach(to vm: VirtualMachine) {
        vm.addExitHandler(self)
        guard polling.enabled else { return }
        vm.addServiceThread(prepare: { [self] in setPollingFlags(polling: true) },
                            run: { [self] vm, stop in pollLoop(vm, stop) }, wake: { [self] in wakeSleepingPoller() })
    }

    /// Tells the device that a producer now appends to its rings (DMP granted a
    /// ring fast path): from now on a write to a target register is a producer's
    /// fallback and wakes a sleeping poller, as after the first carried entry.
    /// A synchronous producer falls back while no consumer polls; without this
    /// its fallbacks would never wake one.
    public func producerAttached() {
        lock.withLock { detachAfterDrain = false }
        carriedEntries.store(true, ordering: .relaxed)
        wakeSleepingPoller()
    }

    /// Tells the device that the producers ``producerAttached()`` announced are gone (DMP took its last ring
    /// fast path out): once the entries they left are applied, a write to a target register is again the guest
    /// using the device directly until a ring carries an entry, and no longer restarts the poller's idle period
    /// (every such exit would otherwise keep the poller polling, on a CPU of its own, for the rest of the run).
    public func producersDetached() {
        lock.lock(); defer { lock.unlock() }
        if rings.contains(where: { $0.mayHaveEntries }) {
            detachAfterDrain = true
        } else {
            detachAfterDrain = false
            carriedEntries.store(false, ordering: .relaxed)
        }
    }

    /// Writes every ring's polling and wake flags. Only the polling thread
    /// writes them, except ``wakeSleepingPoller()``, which clears the wake
    /// flag while the poller sleeps (under the poller's lock: the poller
    /// writes them again only after it has woken).
    func setPollingFlags(polling: Bool, wake: Bool = false) {
        poller.polling.store(polling, ordering: .sequentiallyConsistent)
        for r in rings { r.setFlags(polling: polling, wake: wake) }
    }

    /// Wakes a sleeping poller, clears the rings' wake flag and raises their
    /// polling flag at once, so producers stop kicking before the poller thread
    /// has even run, and synchronous producers append and wait (bounded) for
    /// it instead of falling back until it gets a CPU: on a loaded host that
    /// takes a millisecond or more, and every fallback meanwhile is an exit.
    /// (A producer whose wait runs out kicks: the entry is applied by that exit.)
    func wakeSleepingPoller() {
        poller.wake { [rings] in for r in rings { r.setFlags(polling: true, wake: false) } }
    }
}

/// One ring's consumer state (guarded by the device's lock, except the atomics).
private final class Ring {
    let index: Int
    let target: PVRingTarget
    let header: GuestAddress
    let host: UnsafeMutableRawPointer
    let count: UInt64
    let mask: UInt64
    let valueMask: UInt64
    let hint: SharedGuestWord
    let consumerWord: SharedGuestWord
    /// The consumer index, for the lock-free check (the header's copy is guest-writable).
    let shadow = Atomic<UInt64>(0)
    /// The consumer index (lock held).
    var consumer: UInt64 = 0
    /// The batch buffer: one run of values handed to the device.
    let values: UnsafeMutablePointer<UInt64>
    var stats = PVRingStatistics()

    init(index: Int, target: PVRingTarget, header: GuestAddress, host: UnsafeMutableRawPointer, count: UInt64) {
        self.index = index
        self.target = target
        self.header = header
        self.host = host
        self.count = count
        self.mask = count - 1
        self.valueMask = target.width >= 4 ? 0xffff_ffff : (1 << (UInt64(target.width) * 8)) - 1
        self.hint = SharedGuestWord(pointer: host + Int(PVRingLayout.hintOffset))
        self.consumerWord = SharedGuestWord(pointer: host + Int(PVRingLayout.consumerOffset))
        self.values = .allocate(capacity: Int(min(count, PVRingDevice.maximumBatch)))
        // Every slot starts free for its first lap: sequence = its position.
        for i in 0..<count { slot(i).store(PVRingLayout.slotWord(sequence: UInt32(i), value: 0)) }
    }

    deinit { values.deallocate() }

    /// The slot word of position `p`.
    @inline(__always)
    func slot(_ p: UInt64) -> SharedGuestWord {
        SharedGuestWord(pointer: host + Int(PVRingLayout.slotsOffset + (p & mask) * PVRingLayout.slotSize))
    }

    /// Whether a drain could find entries (lock-free): the slot at the
    /// consumer index published, or the hint past the consumer by at most a
    /// ring (a hole to heal, or entries behind one). Behind it (a producer
    /// stopped before moving it) or far ahead (hostile) there is nothing a
    /// drain could take.
    @inline(__always)
    var mayHaveEntries: Bool {
        let c = shadow.load(ordering: .acquiring)
        let w = slot(c).load()
        if PVRingLayout.sequence(of: w) == UInt32(truncatingIfNeeded: c &+ 1) { return true }
        let ahead = hint.load() &- c
        return ahead != 0 && ahead <= count
    }

    /// Frees the `n` consumed slots from position `c` for their next lap, then publishes the new index.
    @inline(__always)
    func release(from c: UInt64, count n: UInt64) {
        var p = c
        for _ in 0..<n {
            slot(p).store(PVRingLayout.slotWord(sequence: UInt32(truncatingIfNeeded: p &+ count), value: 0))
            p &+= 1
        }
        advance(to: p)
    }

    /// Publishes the consumer index.
    @inline(__always)
    func advance(to c: UInt64) {
        consumer = c
        consumerWord.store(c)
        shadow.store(c, ordering: .releasing)
    }

    /// Writes the header's flags: the synchronous flag as declared, plus the
    /// polling and wake flags as given (the VMM's copy of the flags is the
    /// truth; the guest may have scribbled).
    func setFlags(polling: Bool, wake: Bool) {
        let p = host + Int(PVRingLayout.flagsOffset)
        var f = (target.synchronous ? PVRingLayout.synchronousFlag : 0)
        if polling { f |= PVRingLayout.pollingFlag }
        if wake { f |= PVRingLayout.wakeFlag }
        SharedGuestWord32(pointer: p).store(f)
    }
}

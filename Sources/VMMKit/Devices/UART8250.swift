import Synchronization

/// An 8250/16550-compatible UART: transmit into an ``OutputSink``, with the
/// line status, interrupt enable, line control, divisor latch, modem control
/// (loopback) and scratch registers a polling driver expects.
///
/// Attach it at 8 ports (COM1 is `0x3f8..<0x400`, see ``StandardDevices``).
/// It has no interrupt line yet. Every call is safe from any thread: one lock
/// guards the registers, and transmitted bytes go to the sink after it is released.
///
/// Fast paths (``grantFastPath(_:enableWord:)``):
/// - LSR read (offset 5, 1 byte): the constant `0x60`, exact while the receive
///   FIFO is empty, no overrun is pending and loopback is off. Independent of
///   pending THR ring entries once ``setRingDrain(_:)`` is set (``StandardDevices``
///   sets it): an MCR write that turns loopback on first clears every fast-path
///   word, then drains the rings with the UART's lock released, and only then
///   turns loopback on. An entry published before the words went clear is so
///   applied with loopback off (it transmits and leaves LSR at `0x60`); one
///   published after (a stub that looked at its word just before) lands in the
///   FIFO, but that stub's next LSR read finds its word clear and exits.
///   Without the drain the read is not independent: an entry appended just
///   before another vCPU turns loopback on would be applied after that change
///   and land in the FIFO behind an LSR read already served as `0x60`.
/// - THR write (offset 0, 1 byte), when a ring feeds the register: an
///   asynchronous ring append, exact while DLAB is clear, loopback is off and
///   the THRE interrupt is disabled (IER bit 1 clear).
public final class UART8250: BusDevice, @unchecked Sendable {
    /// `uart`.
    public let name = "uart"
    private let sink: OutputSink
    // Every register below is guarded by `lock`: exclusivity is checked by
    // the lock, not at run time (a dynamic check costs ~50 instructions per access).
    @exclusivity(unchecked) private var ier: UInt8 = 0
    @exclusivity(unchecked) private var lcr: UInt8 = 0x03
    @exclusivity(unchecked) private var mcr: UInt8 = 0x08
    @exclusivity(unchecked) private var scr: UInt8 = 0
    @exclusivity(unchecked) private var dll: UInt8 = 0x0c // 9600 baud
    @exclusivity(unchecked) private var dlm: UInt8 = 0
    @exclusivity(unchecked) private var fcr: UInt8 = 0
    @exclusivity(unchecked) private var rx: [UInt8] = []
    @exclusivity(unchecked) private var overrun = false
    @exclusivity(unchecked) private var thrInterruptPending = false
    @exclusivity(unchecked) private var grants = FastPathGrants()
    /// Guards every register and the grants (held a few instructions at a time: never across the sink or the ring drain).
    private let lock = SpinLock()
    /// The receive FIFO depth of a 16550.
    public static let fifoDepth = 16
    /// The line status register's value while the fast path is exact: transmitter empty, nothing received.
    public static let idleLineStatus: UInt8 = 0x60
    @exclusivity(unchecked) private var transmittedCount = 0
    /// MCR writes between clearing the words and turning loopback on (their drain runs unlocked): words stay clear.
    @exclusivity(unchecked) private var grantsSuspended = 0
    /// Applies every ring entry published so far (``setRingDrain(_:)``).
    @exclusivity(unchecked) private var ringDrain: (@Sendable () -> Void)?
    /// The number of bytes transmitted (sent to the sink).
    public var transmitted: Int { lock.withLock { transmittedCount } }

    /// A UART transmitting into `sink`.
    public init(sink: OutputSink) {
        self.sink = sink
        rx.reserveCapacity(UART8250.fifoDepth)
    }

    private var dlab: Bool { lcr & 0x80 != 0 }
    private var loopback: Bool { mcr & 0x10 != 0 }

    /// Whether a constant LSR read is exact now (lock held).
    private var lineStatusIsConstant: Bool { rx.isEmpty && !overrun && !loopback }
    /// Whether a THR write may be applied later from a ring (lock held).
    private var transmitMayBeDeferred: Bool { !dlab && !loopback && ier & 0x02 == 0 }

    /// Writes every granted enable word to match the state (lock held).
    @inline(__always)
    private func refreshGrants() {
        guard !grants.isEmpty else { return }
        guard grantsSuspended == 0 else { grants.refresh { _ in false }; return }
        let lsr = lineStatusIsConstant, thr = transmitMayBeDeferred
        grants.refresh { $0.direction == .read ? lsr : thr }
    }

    /// Sets what applies every ring entry published so far (the ring consumer's drain; it must not
    /// return before they are applied, and must not be called with a ring feeding MCR). With it the
    /// LSR fast path is independent of pending THR entries (see the type's notes). Set it before the
    /// guest runs.
    public func setRingDrain(_ drain: @escaping @Sendable () -> Void) {
        lock.withLock { ringDrain = drain }
    }

    /// Queues bytes as received input (the guest reads them from RBR). Bytes
    /// beyond the 16-byte FIFO are dropped and flag an overrun, as on a 16550.
    /// Safe from any thread.
    public func receive(_ bytes: [UInt8]) {
        lock.lock(); defer { lock.unlock() }
        for b in bytes { push(b) }
        refreshGrants()
    }

    private func push(_ b: UInt8) {
        if rx.count < UART8250.fifoDepth { rx.append(b) } else { overrun = true }
    }

    /// Reads a register.
    public func read(offset: UInt64, size: Int) -> UInt64 {
        lock.lock(); defer { lock.unlock() }
        switch offset {
        case 0:
            if dlab { return UInt64(dll) }
            guard !rx.isEmpty else { return 0 }
            let b = rx.removeFirst()
            refreshGrants()
            return UInt64(b)
        case 1: return UInt64(dlab ? dlm : ier)
        case 2:
            var iir: UInt8 = 0x01
            if ier & 0x01 != 0 && !rx.isEmpty { iir = 0x04 }
            else if ier & 0x02 != 0 && thrInterruptPending { iir = 0x02; thrInterruptPending = false }
            if fcr & 0x01 != 0 { iir |= 0xc0 }
            return UInt64(iir)
        case 3: return UInt64(lcr)
        case 4: return UInt64(mcr)
        case 5:
            let lsr = lineStatusLocked | (overrun ? 0x02 : 0)
            if overrun { overrun = false; refreshGrants() }
            return UInt64(lsr)
        case 6:
            if loopback {
                // CTS<-RTS, DSR<-DTR, RI<-OUT1, DCD<-OUT2
                let m = mcr
                return UInt64(((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4))
            }
            return 0xb0
        case 7: return UInt64(scr)
        default: return allOnes(size: size)
        }
    }

    /// The line status register: transmitter always empty; data ready when input is queued.
    public var lineStatus: UInt8 { lock.withLock { lineStatusLocked } }
    private var lineStatusLocked: UInt8 { UART8250.idleLineStatus | (rx.isEmpty ? 0 : 0x01) }

    /// Writes a register. A transmitted byte goes to the sink after the UART's lock is released.
    public func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect {
        let b = UInt8(truncatingIfNeeded: value)
        lock.lock()
        if offset == 4, b & 0x10 != 0, !loopback, !grants.isEmpty, let drain = ringDrain {
            // Loopback goes on: clear the words, apply what producers published while they were set, then change.
            grantsSuspended += 1
            refreshGrants()
            lock.unlock()
            atomicMemoryFence(ordering: .sequentiallyConsistent)
            drain()
            lock.lock()
            grantsSuspended -= 1
        }
        var transmit = false
        switch offset {
        case 0:
            if dlab { dll = b }
            else {
                if loopback { push(b) } else { transmit = true; transmittedCount += 1 }
                thrInterruptPending = true
            }
        case 1:
            if dlab { dlm = b } else {
                ier = b & 0x0f
                if ier & 0x02 != 0 { thrInterruptPending = true }
            }
        case 2:
            fcr = b
            if b & 0x02 != 0 { rx.removeAll(keepingCapacity: true) }
        case 3: lcr = b
        case 4: mcr = b & 0x1f
        case 7: scr = b
        default: break
        }
        refreshGrants()
        lock.unlock()
        if transmit { sink.put(b) }
        return .none
    }

    /// A run of THR writes (consumed ring entries) goes to the sink at once,
    /// after the UART's lock is released, while DLAB is clear and loopback is
    /// off; otherwise each value is written as by ``write(offset:size:value:)``.
    public func writeBatch(offset: UInt64, size: Int, values: UnsafeBufferPointer<UInt64>) -> BatchWriteResult {
        lock.lock()
        guard offset == 0 && !dlab && !loopback else {
            lock.unlock()
            for v in values { _ = write(offset: offset, size: size, value: v) }
            return BatchWriteResult(applied: values.count, effect: .none)
        }
        transmittedCount += values.count
        if !values.isEmpty { thrInterruptPending = true }
        refreshGrants()
        lock.unlock()
        sink.put(lowBytesOf: values)
        return BatchWriteResult(applied: values.count, effect: .none)
    }

    /// Grants the LSR constant read and, when `request.ring` names a ring, the
    /// THR ring append (see the type's notes); nothing else: RBR, IIR and MSR
    /// reads have side effects, and the other registers are not hot.
    public func grantFastPath(_ request: FastPathRequest, enableWord: FastPathEnableWord) -> FastPathDescription? {
        guard request.size == 1 else { return nil }
        lock.lock(); defer { lock.unlock() }
        switch (request.offset, request.direction, request.ring) {
        case (5, .read, _):
            let d = FastPathDescription(.constantRead(UInt64(UART8250.idleLineStatus)), for: request,
                                        independentOfPendingRingEntries: ringDrain != nil)
            grants.add(d, word: enableWord, exact: lineStatusIsConstant)
            return d
        case (0, .write, let ring?):
            let d = FastPathDescription(.ringAppend(ring: ring, mode: .asynchronous), for: request)
            grants.add(d, word: enableWord, exact: transmitMayBeDeferred)
            return d
        default:
            return nil
        }
    }

    /// Forgets a grant and clears its word.
    public func revokeFastPath(_ enableWord: FastPathEnableWord) {
        lock.withLock { grants.remove(enableWord) }
    }

    /// Writes out buffered output.
    public func flush() { sink.flush() }
}

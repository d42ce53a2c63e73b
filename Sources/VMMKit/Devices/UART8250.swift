/// An 8250/16550-compatible UART: transmit into an ``OutputSink``, with the
/// line status, interrupt enable, line control, divisor latch, modem control
/// (loopback) and scratch registers a polling driver expects.
///
/// Attach it at 8 ports, for COM1 `0x3f8..<0x400`. It has no interrupt line yet.
public final class UART8250: BusDevice {
    /// `uart`.
    public let name = "uart"
    private let sink: OutputSink
    private var ier: UInt8 = 0
    private var lcr: UInt8 = 0x03
    private var mcr: UInt8 = 0x08
    private var scr: UInt8 = 0
    private var dll: UInt8 = 0x0c // 9600 baud
    private var dlm: UInt8 = 0
    private var fcr: UInt8 = 0
    private var rx: [UInt8] = []
    private var overrun = false
    private var thrInterruptPending = false
    /// Guards the registers: the bus serializes guest accesses, but the host may
    /// call ``receive(_:)`` and ``fastPath(offset:size:direction:)`` from other threads.
    private let lock = ConditionLock()
    /// The receive FIFO depth of a 16550.
    public static let fifoDepth = 16
    private var transmittedCount = 0
    /// The number of bytes transmitted (sent to the sink).
    public var transmitted: Int { lock.withLock { transmittedCount } }

    /// A UART transmitting into `sink`.
    public init(sink: OutputSink) { self.sink = sink }

    private var dlab: Bool { lcr & 0x80 != 0 }
    private var loopback: Bool { mcr & 0x10 != 0 }

    /// Queues bytes as received input (the guest reads them from RBR). Bytes
    /// beyond the 16-byte FIFO are dropped and flag an overrun, as on a 16550.
    /// Safe from any thread.
    public func receive(_ bytes: [UInt8]) {
        lock.withLock { for b in bytes { push(b) } }
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
            return rx.isEmpty ? 0 : UInt64(rx.removeFirst())
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
            overrun = false
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
    private var lineStatusLocked: UInt8 { 0x60 | (rx.isEmpty ? 0 : 0x01) }

    /// Writes a register.
    public func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect {
        let b = UInt8(truncatingIfNeeded: value)
        lock.lock(); defer { lock.unlock() }
        switch offset {
        case 0:
            if dlab { dll = b; break }
            if loopback { push(b) } else { sink.put(b); transmittedCount += 1 }
            thrInterruptPending = true
        case 1:
            if dlab { dlm = b } else {
                ier = b & 0x0f
                if ier & 0x02 != 0 { thrInterruptPending = true }
            }
        case 2:
            fcr = b
            if b & 0x02 != 0 { rx.removeAll() }
        case 3: lcr = b
        case 4: mcr = b & 0x1f
        case 7: scr = b
        default: break
        }
        return .none
    }

    /// LSR reads can be served as a constant while no input is pending and loopback is off;
    /// THR writes can go through a ring while DLAB is clear, loopback is off and no input is pending.
    public func fastPath(offset: UInt64, size: Int, direction: AccessDirection) -> FastPathDescription? {
        lock.lock(); defer { lock.unlock() }
        switch (offset, direction) {
        case (5, .read):
            return FastPathDescription(kind: .constantRead(0x60), offset: 5, size: size, direction: .read,
                                       enabled: rx.isEmpty && !loopback)
        case (0, .write):
            return FastPathDescription(kind: .ringAppend, offset: 0, size: size, direction: .write,
                                       enabled: !dlab && !loopback && rx.isEmpty)
        default:
            return nil
        }
    }

    /// Writes out buffered output.
    public func flush() { sink.flush() }
}

/// Errors from guest-written ring state. Every index and value the guest can
/// write is checked before use.
public enum PVRingError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The producer index is more than a ring's worth ahead of the consumer (or behind it).
    case indexOutOfRange(ring: Int, producer: UInt32, consumer: UInt32, slots: UInt32)
    /// A published slot names a width other than 1, 2, 4 or 8.
    case invalidWidth(ring: Int, slot: UInt32, width: UInt32)
    /// The ring's memory is not backed by guest memory.
    case memory(GuestMemoryError)
    /// The ring layout does not fit in the paravirtual area.
    case layout(String)

    /// A one-line description.
    public var description: String {
        switch self {
        case .indexOutOfRange(let r, let p, let c, let n):
            "paravirtual ring \(r): guest producer index \(p) is out of range (consumer \(c), \(n) slots)"
        case .invalidWidth(let r, let s, let w): "paravirtual ring \(r): slot \(s) has invalid width \(w)"
        case .memory(let e): "paravirtual ring memory: \(e)"
        case .layout(let s): "paravirtual ring layout: \(s)"
        }
    }
}

/// The device register a ring's entries are written to.
public struct PVRingTarget: Hashable, Sendable {
    /// Port I/O or MMIO.
    public var space: BusSpace
    /// The port or guest-physical address.
    public var address: UInt64
    /// Creates a target.
    public init(space: BusSpace, address: UInt64) { self.space = space; self.address = address }
}

/// The paravirtual ring device: shared-memory rings through which a guest
/// posts device writes without exiting, consumed by the VMM. It serves the
/// hand-paravirtualized (static-PV) guests, and DMP's stubs use the same layout.
///
/// Layout (guest-physical, in ``X86Layout/paravirtualArea``): ring `i`'s header
/// at `base + i * 0x2000`: `+0` u32 producer (guest-written, free-running),
/// `+4` u32 consumer (VMM-written), `+8` u32 slot count (power of two),
/// `+12` u32 magic `0x474E4952`. Slots of 16 bytes follow at `+64`: u64 value,
/// u32 width, u32 sequence (= the slot's producer index + 1, written last to
/// publish it).
///
/// The consumer drains every published slot, in order, before the VM handles
/// any port I/O, MMIO or HLT exit (so an exiting access lands behind the
/// ring's earlier entries), at stop, and from a drain timer while the vCPUs
/// run (``VirtualMachine/addPeriodicTask(every:_:)``; ``StandardDevices`` sets it up). A slot reserved but not yet
/// published stops the drain for now; it is never waited for.
public final class PVRingDevice: ExitHandler, @unchecked Sendable {
    /// The header magic, `"RING"`.
    public static let magic: UInt32 = 0x474E_4952
    /// The distance between ring headers.
    public static let stride: UInt64 = 0x2000
    /// Bytes per slot.
    public static let slotSize: UInt64 = 16
    /// Offset of the first slot from the header.
    public static let slotsOffset: UInt64 = 64
    /// How often ``StandardDevices`` drains the rings while vCPUs run without exiting (10 ms).
    public static let drainInterval: UInt64 = 10_000_000

    /// Where ring 0's header is.
    public let base: GuestAddress
    /// Each ring's target, by ring index.
    public let targets: [PVRingTarget]
    /// Slots per ring (the VMM's copy; the guest's copy in the header is not trusted).
    public let slotCount: UInt32
    private let memory: GuestMemory
    private let bus: IOBus
    private var consumers: [UInt32]
    private let lock = ConditionLock()
    private var consumedCounts: [Int]
    /// Entries consumed per ring.
    public var consumed: [Int] { lock.withLock { consumedCounts } }

    /// Creates the rings and writes their headers. The rings occupy
    /// `[base, base + targets.count * stride)`, which must lie inside `area`.
    public init(memory: GuestMemory, bus: IOBus, base: GuestAddress = X86Layout.paravirtualArea.start,
                area: GuestRange = X86Layout.paravirtualArea,
                targets: [PVRingTarget], slotCount: UInt32 = 256) throws(PVRingError) {
        let (span, o) = UInt64(targets.count).multipliedReportingOverflow(by: PVRingDevice.stride)
        guard !o, area.contains(base, length: span) else {
            throw .layout("\(targets.count) rings at \(base) do not fit in \(area)")
        }
        guard slotCount > 0, slotCount & (slotCount - 1) == 0,
              PVRingDevice.slotsOffset + UInt64(slotCount) * PVRingDevice.slotSize <= PVRingDevice.stride else {
            throw .layout("slot count \(slotCount) must be a power of two that fits \(PVRingDevice.stride) bytes")
        }
        self.memory = memory
        self.bus = bus
        self.base = base
        self.targets = targets
        self.slotCount = slotCount
        self.consumers = Array(repeating: 0, count: targets.count)
        self.consumedCounts = Array(repeating: 0, count: targets.count)
        for i in targets.indices {
            let h = header(i)
            do {
                try memory.fill(0, at: h, count: Int(PVRingDevice.stride))
                try memory.write(slotCount, at: GuestAddress(h.rawValue + 8))
                try memory.write(PVRingDevice.magic, at: GuestAddress(h.rawValue + 12))
            } catch { throw .memory(error) }
        }
    }

    /// The guest-physical address of ring `index`'s header.
    public func header(_ index: Int) -> GuestAddress {
        GuestAddress(base.rawValue + UInt64(index) * PVRingDevice.stride)
    }

    /// Consumes every published slot of every ring, writing each to its target
    /// device through the bus. Returns a stop reason if a device asked to stop the VM.
    public func drain() throws(PVRingError) -> StopReason? {
        lock.lock(); defer { lock.unlock() }
        var stop: StopReason?
        for i in targets.indices {
            if let s = try drainRing(i), stop == nil { stop = s }
        }
        return stop
    }

    @inline(__always)
    private func drainRing(_ i: Int) throws(PVRingError) -> StopReason? {
        let h = header(i).rawValue
        let producer: UInt32
        do { producer = try memory.loadAcquire(at: GuestAddress(h)) } catch { throw .memory(error) }
        var consumer = consumers[i]
        if producer == consumer { return nil }
        guard producer &- consumer <= slotCount else {
            throw .indexOutOfRange(ring: i, producer: producer, consumer: consumer, slots: slotCount)
        }
        var stop: StopReason?
        let target = targets[i]
        // Record progress even when a later slot is refused, so nothing is written twice.
        defer {
            consumers[i] = consumer
            try? memory.storeRelease(consumer, at: GuestAddress(h + 4))
        }
        while consumer != producer {
            let slot = h + PVRingDevice.slotsOffset + UInt64(consumer & (slotCount - 1)) * PVRingDevice.slotSize
            let value: UInt64, width: UInt32, seq: UInt32
            do {
                seq = try memory.loadAcquire(at: GuestAddress(slot + 12))
                guard seq == consumer &+ 1 else { break } // reserved, not yet published
                value = try memory.read(at: GuestAddress(slot))
                width = try memory.read(at: GuestAddress(slot + 8))
            } catch { throw .memory(error) }
            guard width == 1 || width == 2 || width == 4 || width == 8 else {
                throw .invalidWidth(ring: i, slot: consumer, width: width)
            }
            let masked = width == 8 ? value : value & ((1 << (UInt64(width) * 8)) - 1)
            if case .stopVM(let s)? = bus.write(target.space, address: target.address, size: Int(width), value: masked), stop == nil {
                stop = .guestExit(status: s)
            }
            consumer &+= 1
            consumedCounts[i] += 1
        }
        return stop
    }

    /// Drains the rings before port I/O, MMIO and HLT exits are handled, then passes the exit on.
    public func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
        switch exit {
        case .io, .mmio, .halt:
            do {
                if let stop = try drain() { return .stopVM(stop) }
            } catch { throw .ring(error) }
            return .pass
        default:
            return .pass
        }
    }

    /// Drains what the guest published before it stopped.
    public func vmDidStop(_ vm: VirtualMachine) throws(VMError) {
        do { _ = try drain() } catch { throw .ring(error) }
    }
}

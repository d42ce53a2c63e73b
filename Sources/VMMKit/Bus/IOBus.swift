import Synchronization

/// The address space a bus serves.
public enum BusSpace: String, Hashable, Sendable {
    /// x86 I/O ports.
    case pio
    /// Guest-physical memory not backed by RAM.
    case mmio
}

/// Errors when attaching devices to a bus.
public enum BusError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The range overlaps one already attached.
    case overlap(space: BusSpace, new: GuestRange, existing: GuestRange, device: String)
    /// The range is empty or wraps around the address space.
    case invalidRange(space: BusSpace, GuestRange)

    /// A one-line description.
    public var description: String {
        switch self {
        case .overlap(let s, let n, let e, let d): "\(s) range \(n) overlaps \(e) of device '\(d)'"
        case .invalidRange(let s, let r): "\(s) range \(r) is empty or wraps"
        }
    }
}

/// One unclaimed access, for diagnostics.
public struct UnclaimedAccess: Hashable, Sendable {
    /// Port or MMIO.
    public var space: BusSpace
    /// The port or guest-physical address.
    public var address: UInt64
    /// Read or write.
    public var direction: AccessDirection
    /// Creates a record.
    public init(space: BusSpace, address: UInt64, direction: AccessDirection) {
        self.space = space; self.address = address; self.direction = direction
    }
}

/// Dispatches port I/O and MMIO accesses to the devices attached at address ranges.
///
/// Dispatch takes no lock: the range table is immutable and replaced as a
/// whole when a device is attached (attaching while the VM runs is safe; an
/// access sees the table before or after), and devices guard their own state.
///
/// Widths: devices see only 1, 2, 4 and 8 bytes. An access of 3, 5, 6 or 7
/// bytes is split into naturally sized pieces at ascending addresses (4, 2,
/// then 1 byte), each routed on its own, and a read's pieces are put together
/// little-endian. An access of 0 bytes or more than 8 reaches no device: it
/// counts as unclaimed and as refused (``refusedSizeCount``).
///
/// Unclaimed accesses follow the PC convention: reads return all ones and
/// writes are dropped; each is counted per address (``unclaimedCounts``).
public final class IOBus: @unchecked Sendable {
    struct Entry {
        let range: GuestRange
        let device: any BusDevice
    }

    struct KernelRange {
        let space: BusSpace
        let range: GuestRange
        let kind: KernelHandledKind
    }

    /// One immutable version of the bus's ranges.
    final class Table {
        let pio: [Entry]
        let mmio: [Entry]
        let kernel: [KernelRange]
        /// ``pio`` and ``mmio`` for the exit path: sorted routes whose devices
        /// are boxed, so a dispatch borrows the device instead of retaining it.
        let pioRoutes: UnsafeMutableBufferPointer<Route>
        let mmioRoutes: UnsafeMutableBufferPointer<Route>
        init(pio: [Entry], mmio: [Entry], kernel: [KernelRange]) {
            self.pio = pio; self.mmio = mmio; self.kernel = kernel
            pioRoutes = Table.routes(pio)
            mmioRoutes = Table.routes(mmio)
        }

        deinit {
            for r in pioRoutes { r.box.release() }
            for r in mmioRoutes { r.box.release() }
            pioRoutes.deallocate()
            mmioRoutes.deallocate()
        }

        private static func routes(_ entries: [Entry]) -> UnsafeMutableBufferPointer<Route> {
            let b = UnsafeMutableBufferPointer<Route>.allocate(capacity: entries.count)
            _ = b.initialize(from: entries.map {
                Route(start: $0.range.start.rawValue, size: $0.range.size, box: .passRetained(DeviceBox($0.device)))
            })
            return b
        }

        @inline(__always)
        func routes(_ space: BusSpace) -> UnsafeMutableBufferPointer<Route> { space == .pio ? pioRoutes : mmioRoutes }
    }

    /// A device's range, for the exit path.
    struct Route {
        let start: UInt64
        let size: UInt64
        let box: Unmanaged<DeviceBox>
    }

    /// A device, boxed so the exit path can borrow it.
    final class DeviceBox {
        let device: any BusDevice
        init(_ device: any BusDevice) { self.device = device }
    }

    /// The current table. Tables are never freed while the bus lives (``tables``
    /// keeps every version), so a reader needs no reference count.
    private let current: Atomic<Unmanaged<Table>>
    /// Every table ever published, guarded by ``attachLock``.
    private var tables: [Table]
    private let attachLock = ConditionLock()

    private var unclaimed: [UnclaimedAccess: Int] = [:]
    private var overflow = 0
    private var refused = 0
    private let unclaimedLock = ConditionLock()
    /// How many distinct unclaimed addresses are counted (a guest can touch many; memory stays bounded).
    public static let unclaimedAddressLimit = 4096

    /// Creates an empty bus.
    public init() {
        let t = Table(pio: [], mmio: [], kernel: [])
        tables = [t]
        current = Atomic(Unmanaged.passUnretained(t))
    }

    @inline(__always)
    private func withTable<R>(_ body: (Table) -> R) -> R {
        current.load(ordering: .acquiring)._withUnsafeGuaranteedRef(body)
    }

    /// Publishes a new table built from the current one (attach lock held).
    private func publish(_ make: (Table) -> Table) {
        let t = make(tables[tables.count - 1])
        tables.append(t)
        current.store(Unmanaged.passUnretained(t), ordering: .releasing)
    }

    /// Attaches `device` at `ports` (for example `0x3f8..<0x400`).
    public func attach(_ device: any BusDevice, ports: Range<UInt16>) throws(BusError) {
        try attach(device, space: .pio, range: GuestRange(start: GuestAddress(UInt64(ports.lowerBound)), size: UInt64(ports.count)))
    }

    /// Attaches `device` at a guest-physical MMIO range.
    public func attach(_ device: any BusDevice, mmio range: GuestRange) throws(BusError) {
        try attach(device, space: .mmio, range: range)
    }

    /// Attaches `device` in `space` at `range`; overlapping ranges are rejected.
    /// Safe while the VM runs.
    public func attach(_ device: any BusDevice, space: BusSpace, range: GuestRange) throws(BusError) {
        try IOBus.check(range, space)
        attachLock.lock(); defer { attachLock.unlock() }
        let old = tables[tables.count - 1]
        let list = space == .pio ? old.pio : old.mmio
        if let clash = list.first(where: { $0.range.overlaps(range) }) {
            throw .overlap(space: space, new: range, existing: clash.range, device: clash.device.name)
        }
        var new = list + [Entry(range: range, device: device)]
        new.sort { $0.range.start < $1.range.start }
        publish { t in
            space == .pio ? Table(pio: new, mmio: t.mmio, kernel: t.kernel) : Table(pio: t.pio, mmio: new, kernel: t.kernel)
        }
    }

    private static func check(_ range: GuestRange, _ space: BusSpace) throws(BusError) {
        guard range.size > 0, range.end != nil || range.start.rawValue &+ range.size == 0 else {
            throw .invalidRange(space: space, range)
        }
    }

    /// Records that the kernel handles accesses in `range` without an exit (an
    /// ioeventfd, a coalesced zone), so no fast path is granted there.
    /// ``VirtualMachine/registerCoalescedZone(_:)`` and
    /// ``VirtualMachine/registerIOEventFD(_:)`` call it; call it yourself for
    /// registrations made through the backend directly.
    public func markKernelHandled(space: BusSpace, range: GuestRange, kind: KernelHandledKind) throws(BusError) {
        try IOBus.check(range, space)
        attachLock.lock(); defer { attachLock.unlock() }
        publish { t in Table(pio: t.pio, mmio: t.mmio, kernel: t.kernel + [KernelRange(space: space, range: range, kind: kind)]) }
        // Fast paths granted there before the kernel took the range over are
        // no longer exact (the kernel now sees those accesses first): revoke them.
        grants.removeAll { g in
            guard g.space == space, g.range.overlaps(range) else { return false }
            g.device.revokeFastPath(g.enableWord)
            return true
        }
    }

    /// A fast path the bus granted, kept so that a range the kernel takes over later revokes it.
    private struct Grant {
        var space: BusSpace
        var range: GuestRange
        var device: any BusDevice
        var enableWord: FastPathEnableWord
    }
    /// Granted fast paths, guarded by ``attachLock`` (grants are rare, never on the exit path).
    private var grants: [Grant] = []

    /// How the kernel handles an access of `size` bytes at `address`, if any part of it lies in a marked range.
    public func kernelHandling(space: BusSpace, address: UInt64, size: Int) -> KernelHandledKind? {
        let access = GuestRange(start: GuestAddress(address), size: UInt64(max(size, 1)))
        return withTable { t in t.kernel.first { $0.space == space && $0.range.overlaps(access) }?.kind }
    }

    /// The device attached at `address` in `space`, with the offset of `address` into its range.
    public func device(at address: UInt64, space: BusSpace) -> (device: any BusDevice, offset: UInt64, range: GuestRange)? {
        guard let e = find(address, space) else { return nil }
        return (e.device, address - e.range.start.rawValue, e.range)
    }

    @inline(__always)
    private func find(_ address: UInt64, _ space: BusSpace) -> Entry? {
        withTable { t in
            let list = space == .pio ? t.pio : t.mmio
            // Binary search for the last entry starting at or below `address`.
            var lo = 0, hi = list.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if list[mid].range.start.rawValue <= address { lo = mid + 1 } else { hi = mid }
            }
            guard lo > 0 else { return nil }
            let e = list[lo - 1]
            return e.range.contains(GuestAddress(address)) ? e : nil
        }
    }

    /// Calls `body` with the device claiming `address` and the offset into its
    /// range, the device borrowed (no reference counting); `nil` when no
    /// device claims the address.
    @inline(__always)
    private func route<R>(_ address: UInt64, _ space: BusSpace, _ body: (borrowing any BusDevice, UInt64) -> R) -> R? {
        withTable { t in
            let list = t.routes(space)
            // Binary search for the last route starting at or below `address`.
            var lo = 0, hi = list.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if list[mid].start <= address { lo = mid + 1 } else { hi = mid }
            }
            guard lo > 0 else { return nil }
            let r = list[lo - 1]
            let offset = address &- r.start
            guard offset < r.size else { return nil }
            return r.box._withUnsafeGuaranteedRef { body($0.device, offset) }
        }
    }

    /// Whether devices may see an access of `size` bytes as it is.
    @inline(__always)
    static func isDeviceSize(_ size: Int) -> Bool { size == 1 || size == 2 || size == 4 || size == 8 }

    /// The first piece of a split access of `remaining` bytes (3, 5, 6 or 7): the largest power of two below it.
    @inline(__always)
    static func pieceSize(_ remaining: Int) -> Int { remaining >= 4 ? 4 : remaining >= 2 ? 2 : 1 }

    /// Reads `size` bytes at `address`. Returns `nil` when no device claims the
    /// address (the caller then returns all ones to the guest); see the type's
    /// notes for widths other than 1, 2, 4 and 8.
    @inline(__always)
    public func read(_ space: BusSpace, address: UInt64, size: Int) -> UInt64? {
        if IOBus.isDeviceSize(size) { return readOne(space, address, size) }
        guard size > 0, size < 8 else { return refuse(space, address, .read) }
        var value: UInt64 = 0, claimed = false, done = 0
        while done < size {
            let n = IOBus.pieceSize(size - done)
            let piece = readOne(space, address &+ UInt64(done), n)
            claimed = claimed || piece != nil
            value |= ((piece ?? allOnes(size: n)) & allOnes(size: n)) << UInt64(done * 8)
            done += n
        }
        return claimed ? value : nil
    }

    /// Writes `size` bytes at `address`. Returns `nil` when no device claims the
    /// address; a split write returns the first piece's stop effect, if any.
    @inline(__always)
    public func write(_ space: BusSpace, address: UInt64, size: Int, value: UInt64) -> DeviceEffect? {
        if IOBus.isDeviceSize(size) { return writeOne(space, address, size, value) }
        guard size > 0, size < 8 else { return refuse(space, address, .write) }
        var effect: DeviceEffect?, done = 0
        while done < size {
            let n = IOBus.pieceSize(size - done)
            let piece = (value >> UInt64(done * 8)) & allOnes(size: n)
            if let e = writeOne(space, address &+ UInt64(done), n, piece), effect == nil || effect == DeviceEffect.none {
                effect = e
            }
            done += n
        }
        return effect
    }

    /// Writes `values` in order, each as a `size`-byte write at `address`, to
    /// the device there in one call (``BusDevice/writeBatch(offset:size:values:)``).
    /// Returns `nil` when no device claims the address (the writes are dropped
    /// and counted once per value). Widths other than 1, 2, 4 and 8 go
    /// value by value through ``write(_:address:size:value:)``.
    public func writeBatch(_ space: BusSpace, address: UInt64, size: Int, values: UnsafeBufferPointer<UInt64>) -> BatchWriteResult? {
        guard IOBus.isDeviceSize(size) else {
            var claimed = false
            for (i, v) in values.enumerated() {
                guard let e = write(space, address: address, size: size, value: v) else { continue }
                claimed = true
                if e != .none { return BatchWriteResult(applied: i + 1, effect: e) }
            }
            return claimed ? BatchWriteResult(applied: values.count, effect: .none) : nil
        }
        guard let r = route(address, space, { d, offset in d.writeBatch(offset: offset, size: size, values: values) }) else {
            for _ in values { countUnclaimed(UnclaimedAccess(space: space, address: address, direction: .write)) }
            return nil
        }
        // A device's count is not trusted past the batch it was given.
        return BatchWriteResult(applied: min(max(r.applied, 0), values.count), effect: r.effect)
    }

    @inline(__always)
    private func readOne(_ space: BusSpace, _ address: UInt64, _ size: Int) -> UInt64? {
        guard let v = route(address, space, { d, offset in d.read(offset: offset, size: size) }) else {
            countUnclaimed(UnclaimedAccess(space: space, address: address, direction: .read))
            return nil
        }
        return v
    }

    @inline(__always)
    private func writeOne(_ space: BusSpace, _ address: UInt64, _ size: Int, _ value: UInt64) -> DeviceEffect? {
        guard let e = route(address, space, { d, offset in d.write(offset: offset, size: size, value: value) }) else {
            countUnclaimed(UnclaimedAccess(space: space, address: address, direction: .write))
            return nil
        }
        return e
    }

    private func refuse<T>(_ space: BusSpace, _ address: UInt64, _ direction: AccessDirection) -> T? {
        unclaimedLock.withLock { refused &+= 1 }
        countUnclaimed(UnclaimedAccess(space: space, address: address, direction: direction))
        return nil
    }

    private func countUnclaimed(_ a: UnclaimedAccess) {
        unclaimedLock.lock(); defer { unclaimedLock.unlock() }
        if let n = unclaimed[a] { unclaimed[a] = n &+ 1 }
        else if unclaimed.count < IOBus.unclaimedAddressLimit { unclaimed[a] = 1 }
        else { overflow &+= 1 }
    }

    /// How many times each unclaimed address was accessed (up to ``unclaimedAddressLimit`` addresses).
    public var unclaimedCounts: [UnclaimedAccess: Int] {
        unclaimedLock.withLock { unclaimed }
    }

    /// Unclaimed accesses not counted per address because ``unclaimedAddressLimit`` distinct addresses were already tracked.
    public var unclaimedOverflow: Int { unclaimedLock.withLock { overflow } }

    /// Accesses of 0 bytes or more than 8 bytes, which reach no device.
    public var refusedSizeCount: Int { unclaimedLock.withLock { refused } }

    /// All attached devices with their ranges.
    public var attached: [(space: BusSpace, range: GuestRange, device: any BusDevice)] {
        withTable { t in t.pio.map { (.pio, $0.range, $0.device) } + t.mmio.map { (.mmio, $0.range, $0.device) } }
    }

    /// Asks the device at `address` for a fast path for an access of `size`
    /// bytes in `direction`, handing it `enableWord` (DESIGN.md, DMP step 3).
    ///
    /// The bus refuses widths other than 1, 2, 4 and 8, accesses that run past
    /// the device's range, and registers the kernel handles
    /// (``markKernelHandled(space:range:kind:)``); it checks that the device's
    /// answer fits the request. `ring` is the ring whose consumer writes to
    /// this register, if any; `slot` a shared slot the device may keep current
    /// for a read (passed on for reads only). On success the device owns the
    /// word's value, and the slot's if it granted a shared-slot read, until
    /// ``revokeFastPath(space:address:enableWord:)``.
    public func grantFastPath(space: BusSpace, address: UInt64, size: Int, direction: AccessDirection,
                              ring: Int? = nil, slot: FastPathSlot? = nil, enableWord: FastPathEnableWord)
        throws(FastPathRefusal) -> (device: any BusDevice, description: FastPathDescription) {
        guard IOBus.isDeviceSize(size) else { throw .unsupportedSize(size) }
        // Under the attach lock, so a range the kernel takes over meanwhile cannot slip between check and grant.
        attachLock.lock(); defer { attachLock.unlock() }
        guard let e = find(address, space) else { throw .unclaimed }
        guard e.range.contains(GuestAddress(address), length: UInt64(size)) else { throw .crossesRangeEnd }
        if let k = kernelHandling(space: space, address: address, size: size) { throw .kernelHandled(k) }
        let request = FastPathRequest(offset: address - e.range.start.rawValue, size: size, direction: direction, ring: ring,
                                      slot: direction == .read ? slot : nil)
        guard let d = e.device.grantFastPath(request, enableWord: enableWord) else {
            throw .declined(device: e.device.name)
        }
        guard IOBus.fits(d, request) else {
            e.device.revokeFastPath(enableWord)
            throw .invalidDeclaration(device: e.device.name)
        }
        grants.append(Grant(space: space, range: GuestRange(start: GuestAddress(address), size: UInt64(size)),
                            device: e.device, enableWord: enableWord))
        return (e.device, d)
    }

    /// Whether a device's answer fits the request it was given.
    static func fits(_ d: FastPathDescription, _ r: FastPathRequest) -> Bool {
        guard d.offset == r.offset, d.size == r.size, d.direction == r.direction,
              d.kind.servesReads == (r.direction == .read) else { return false }
        switch d.kind {
        case .ringAppend(let ring, _): return ring == r.ring
        case .sharedSlotRead(let slot): return slot == r.slot?.index
        default: return true
        }
    }

    /// Revokes the fast path granted with `enableWord` by the device at `address`.
    public func revokeFastPath(space: BusSpace, address: UInt64, enableWord: FastPathEnableWord) {
        attachLock.lock(); defer { attachLock.unlock() }
        grants.removeAll { $0.enableWord == enableWord }
        find(address, space)?.device.revokeFastPath(enableWord)
    }
}

/// All ones for an access of `size` bytes (the PC convention for unclaimed reads).
@inline(__always)
public func allOnes(size: Int) -> UInt64 {
    size >= 8 ? UInt64.max : size <= 0 ? 0 : (UInt64(1) << (UInt64(size) * 8)) &- 1
}

/// What a device asks of the VM after an access.
public enum DeviceEffect: Hashable, Sendable {
    /// Nothing: the access is complete.
    case none
    /// Stop the VM with this guest exit status (the debug-exit port).
    case stopVM(status: UInt32)
}

/// A device on the I/O bus: a plain type that serves reads and writes of its
/// registers. Devices know nothing about KVM; the bus serializes calls to them
/// (one lock for the bus), so a device needs no locking of its own unless it
/// shares state with other threads.
public protocol BusDevice: AnyObject {
    /// A short name for diagnostics (`uart`, `debug-exit`).
    var name: String { get }
    /// Reads `size` bytes (1 to 8) at `offset` from the start of the range the device was attached at.
    func read(offset: UInt64, size: Int) -> UInt64
    /// Writes `size` bytes (1 to 8) of `value` at `offset`.
    func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect
    /// The fast path the device offers for one of its registers, if any (see ``FastPathDescription``).
    func fastPath(offset: UInt64, size: Int, direction: AccessDirection) -> FastPathDescription?
}

extension BusDevice {
    /// By default a device offers no fast path.
    public func fastPath(offset: UInt64, size: Int, direction: AccessDirection) -> FastPathDescription? { nil }
}

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
/// Unclaimed accesses follow the PC convention: reads return all ones and
/// writes are dropped; each is counted per address (``unclaimedCounts``).
public final class IOBus: @unchecked Sendable {
    struct Entry {
        let range: GuestRange
        let device: any BusDevice
    }

    @exclusivity(unchecked) private var pio: [Entry] = []
    @exclusivity(unchecked) private var mmio: [Entry] = []
    private var unclaimed: [UnclaimedAccess: Int] = [:]
    /// Unclaimed accesses not counted per address because ``unclaimedAddressLimit`` distinct addresses were already tracked.
    public private(set) var unclaimedOverflow = 0
    /// How many distinct unclaimed addresses are counted (a guest can touch many; memory stays bounded).
    public static let unclaimedAddressLimit = 4096
    private let lock = ConditionLock()

    /// Creates an empty bus.
    public init() {}

    /// Attaches `device` at `ports` (for example `0x3f8..<0x400`).
    public func attach(_ device: any BusDevice, ports: Range<UInt16>) throws(BusError) {
        try attach(device, space: .pio, range: GuestRange(start: GuestAddress(UInt64(ports.lowerBound)), size: UInt64(ports.count)))
    }

    /// Attaches `device` at a guest-physical MMIO range.
    public func attach(_ device: any BusDevice, mmio range: GuestRange) throws(BusError) {
        try attach(device, space: .mmio, range: range)
    }

    /// Attaches `device` in `space` at `range`; overlapping ranges are rejected.
    public func attach(_ device: any BusDevice, space: BusSpace, range: GuestRange) throws(BusError) {
        guard range.size > 0, range.end != nil || range.start.rawValue &+ range.size == 0 else {
            throw .invalidRange(space: space, range)
        }
        lock.lock(); defer { lock.unlock() }
        let list = space == .pio ? pio : mmio
        if let clash = list.first(where: { $0.range.overlaps(range) }) {
            throw .overlap(space: space, new: range, existing: clash.range, device: clash.device.name)
        }
        var new = list + [Entry(range: range, device: device)]
        new.sort { $0.range.start < $1.range.start }
        if space == .pio { pio = new } else { mmio = new }
    }

    /// The device attached at `address` in `space`, with the offset of `address` into its range.
    public func device(at address: UInt64, space: BusSpace) -> (device: any BusDevice, offset: UInt64, range: GuestRange)? {
        lock.lock(); defer { lock.unlock() }
        guard let e = find(address, space) else { return nil }
        return (e.device, address - e.range.start.rawValue, e.range)
    }

    @inline(__always)
    private func find(_ address: UInt64, _ space: BusSpace) -> Entry? {
        let list = space == .pio ? pio : mmio
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

    /// Reads `size` bytes at `address`. Returns `nil` when no device claims the address
    /// (the caller then returns all ones to the guest).
    @inline(__always)
    public func read(_ space: BusSpace, address: UInt64, size: Int) -> UInt64? {
        lock.lock(); defer { lock.unlock() }
        guard let e = find(address, space) else {
            countUnclaimed(UnclaimedAccess(space: space, address: address, direction: .read))
            return nil
        }
        return e.device.read(offset: address - e.range.start.rawValue, size: size)
    }

    /// Writes `size` bytes at `address`. Returns `nil` when no device claims the address.
    @inline(__always)
    public func write(_ space: BusSpace, address: UInt64, size: Int, value: UInt64) -> DeviceEffect? {
        lock.lock(); defer { lock.unlock() }
        guard let e = find(address, space) else {
            countUnclaimed(UnclaimedAccess(space: space, address: address, direction: .write))
            return nil
        }
        return e.device.write(offset: address - e.range.start.rawValue, size: size, value: value)
    }

    private func countUnclaimed(_ a: UnclaimedAccess) {
        if let n = unclaimed[a] { unclaimed[a] = n &+ 1 }
        else if unclaimed.count < IOBus.unclaimedAddressLimit { unclaimed[a] = 1 }
        else { unclaimedOverflow &+= 1 }
    }

    /// How many times each unclaimed address was accessed (up to ``unclaimedAddressLimit`` addresses).
    public var unclaimedCounts: [UnclaimedAccess: Int] {
        lock.withLock { unclaimed }
    }

    /// All attached devices with their ranges.
    public var attached: [(space: BusSpace, range: GuestRange, device: any BusDevice)] {
        lock.withLock { pio.map { (.pio, $0.range, $0.device) } + mmio.map { (.mmio, $0.range, $0.device) } }
    }
}

/// All ones for an access of `size` bytes (the PC convention for unclaimed reads).
@inline(__always)
public func allOnes(size: Int) -> UInt64 {
    size >= 8 ? UInt64.max : (UInt64(1) << (UInt64(size) * 8)) &- 1
}

/// The location and access of an exiting instruction: the unit exit
/// statistics count (and DMP's hotspot detector watches).
public struct ExitSite: Hashable, Sendable {
    /// The guest RIP reported at the exit (on some hosts already past the instruction).
    public var rip: UInt64
    /// The exit kind.
    public var kind: ExitKind
    /// The port, MMIO address or MSR index.
    public var address: UInt64
    /// The access width in bytes (0 when not an access).
    public var size: UInt8
    /// Read or write.
    public var direction: AccessDirection

    /// Creates a site.
    @inlinable
    public init(rip: UInt64, kind: ExitKind, address: UInt64, size: UInt8, direction: AccessDirection) {
        self.rip = rip; self.kind = kind; self.address = address; self.size = size; self.direction = direction
    }
}

/// Exit counts per exit kind and, optionally, per site: a snapshot.
///
/// The exit path does not update this value: each vCPU counts into plain
/// counters and an ``ExitSiteTable`` (no hashing through `Hasher`, no
/// allocation per exit), and ``ExitContext/statistics`` and
/// ``VirtualMachine/statistics()`` build a snapshot from them on request.
public struct ExitStatistics: Sendable {
    /// Counts indexed by ``ExitKind/rawValue``.
    public private(set) var counts: [Int]
    /// Counts per site (only when site collection is on).
    public private(set) var sites: [ExitSite: Int] = [:]
    /// Whether per-site counts are collected.
    public let collectSites: Bool

    /// Empty statistics.
    public init(collectSites: Bool = false) {
        counts = Array(repeating: 0, count: ExitKind.allCases.count)
        self.collectSites = collectSites
    }

    /// The number of exits of `kind`.
    public subscript(kind: ExitKind) -> Int { counts[kind.rawValue] }

    /// The number of exits of every kind except ``ExitKind/interrupted``.
    public var total: Int { counts.enumerated().reduce(0) { $0 + ($1.offset == ExitKind.interrupted.rawValue ? 0 : $1.element) } }

    /// Counts one exit.
    @inline(__always)
    public mutating func record(_ kind: ExitKind) { counts[kind.rawValue] &+= 1 }

    /// Adds `count` exits of `kind`.
    public mutating func add(_ kind: ExitKind, count: Int) { counts[kind.rawValue] &+= count }

    /// Adds `count` exits at `site` (sites beyond ``siteLimit`` go to ``untrackedSiteExits``).
    public mutating func add(site: ExitSite, count: Int) {
        if let n = sites[site] { sites[site] = n &+ count }
        else if sites.count < ExitStatistics.siteLimit { sites[site] = count }
        else { untrackedSiteExits &+= count }
    }

    /// Adds `count` exits that were not counted per site.
    public mutating func addUntracked(_ count: Int) { untrackedSiteExits &+= count }

    /// Exits not counted per site because ``siteLimit`` distinct sites were already tracked.
    public private(set) var untrackedSiteExits = 0
    /// How many distinct sites are counted (memory stays bounded whatever the guest does).
    public static let siteLimit = 65536

    /// Counts one exit at a site.
    public mutating func record(site: ExitSite) { add(site: site, count: 1) }

    /// Adds another vCPU's statistics into these.
    public mutating func merge(_ other: ExitStatistics) {
        for i in counts.indices { counts[i] &+= other.counts[i] }
        for (k, v) in other.sites { add(site: k, count: v) }
        untrackedSiteExits &+= other.untrackedSiteExits
    }

    /// The sites sorted by count, most first.
    public func topSites(_ n: Int) -> [(site: ExitSite, count: Int)] {
        sites.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key.rip < $1.key.rip }.prefix(n).map { ($0.key, $0.value) }
    }
}
extension ExitStatistics {
    /// The site an exit happened at.
    @inline(__always)
    public static func site(for exit: VMExit, rip: UInt64) -> ExitSite {
        switch exit {
        case .io(let io): ExitSite(rip: rip, kind: .io, address: UInt64(io.port), size: io.size, direction: io.direction)
        case .mmio(let m): ExitSite(rip: rip, kind: .mmio, address: m.address.rawValue, size: m.size, direction: m.direction)
        case .msrRead(let i): ExitSite(rip: rip, kind: .msr, address: UInt64(i), size: 8, direction: .read)
        case .msrWrite(let i, _): ExitSite(rip: rip, kind: .msr, address: UInt64(i), size: 8, direction: .write)
        default: ExitSite(rip: rip, kind: exit.kind, address: 0, size: 0, direction: .read)
        }
    }
}

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
    public init(rip: UInt64, kind: ExitKind, address: UInt64, size: UInt8, direction: AccessDirection) {
        self.rip = rip; self.kind = kind; self.address = address; self.size = size; self.direction = direction
    }
}

/// Exit counts per exit kind and, optionally, per site.
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

    /// Exits not counted per site because ``siteLimit`` distinct sites were already tracked.
    public private(set) var untrackedSiteExits = 0
    /// How many distinct sites are counted (memory stays bounded whatever the guest does).
    public static let siteLimit = 65536

    /// Counts one exit at a site.
    @inline(__always)
    public mutating func record(site: ExitSite) {
        if let n = sites[site] { sites[site] = n &+ 1 }
        else if sites.count < ExitStatistics.siteLimit { sites[site] = 1 }
        else { untrackedSiteExits &+= 1 }
    }

    /// Adds another vCPU's statistics into these.
    public mutating func merge(_ other: ExitStatistics) {
        for i in counts.indices { counts[i] &+= other.counts[i] }
        for (k, v) in other.sites { sites[k, default: 0] &+= v }
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

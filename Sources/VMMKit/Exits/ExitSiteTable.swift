/// Counts exits per ``ExitSite`` in a fixed-size open-addressing table: no
/// hashing through `Hasher` (SipHash), no allocation after creation, a
/// bounded number of probes per exit, and a count of the exits it could not
/// place (``overflow``) once it holds ``capacity`` sites or a probe sequence
/// is exhausted.
///
/// One table belongs to one vCPU thread (the exit path writes it without
/// locks); read it from another thread only while that vCPU is stopped or
/// paused. The run loop keeps one per vCPU when
/// ``VMConfiguration/collectSiteStatistics`` is on; a hotspot detector first in
/// the exit chain can keep its own and act on the count ``record(_:)`` returns.
public final class ExitSiteTable: @unchecked Sendable {
    struct Slot {
        var rip: UInt64
        var address: UInt64
        /// 0 = empty; else bit 63 | kind << 16 | size << 8 | direction.
        var tag: UInt64
        var count: UInt64
    }

    /// The most distinct sites the table holds.
    public let capacity: Int
    /// The number of distinct sites held.
    public private(set) var count = 0
    /// Exits not counted: the table was full or the probe limit was reached.
    public private(set) var overflow = 0
    /// How many slots one lookup visits at most.
    public static let probeLimit = 32

    private let slots: UnsafeMutablePointer<Slot>
    private let mask: Int
    private let seed: UInt64
    private let mappedBytes: Int

    /// A table for up to `capacity` distinct sites (at least 16). It reserves
    /// twice that many 32-byte slots, rounded up to a power of two, as
    /// anonymous memory the system commits only where slots are used.
    public init(capacity: Int) {
        self.capacity = max(16, capacity)
        var n = 16
        while n < 2 * self.capacity { n <<= 1 }
        mask = n - 1
        let bytes = n * MemoryLayout<Slot>.stride
        switch HostMemory.mapAnonymous(size: bytes) {
        case .success(let p):
            // Anonymous pages read as zero (empty slots) and are committed only when touched.
            slots = p.bindMemory(to: Slot.self, capacity: n)
            mappedBytes = bytes
        case .failure:
            slots = .allocate(capacity: n)
            slots.initialize(repeating: Slot(rip: 0, address: 0, tag: 0, count: 0), count: n)
            mappedBytes = 0
        }
        // A per-table seed: a guest cannot choose RIPs that collide in every VMM.
        seed = UInt64.random(in: 1...UInt64.max)
    }

    deinit {
        if mappedBytes > 0 { HostMemory.unmap(UnsafeMutableRawPointer(slots), size: mappedBytes) } else { slots.deallocate() }
    }

    @inline(__always)
    static func tag(_ site: ExitSite) -> UInt64 { ExitSiteHash.tag(site) }

    @inline(__always)
    private func start(_ rip: UInt64, _ address: UInt64, _ tag: UInt64) -> Int {
        ExitSiteHash.start(rip: rip, address: address, tag: tag, seed: seed, mask: mask)
    }

    /// Counts one exit at `site` and returns the site's new count (0 when it
    /// could not be placed and was counted in ``overflow``).
    @inline(__always)
    @discardableResult
    public func record(_ site: ExitSite) -> Int {
        let tag = ExitSiteTable.tag(site)
        var i = start(site.rip, site.address, tag)
        for _ in 0..<ExitSiteTable.probeLimit {
            let s = slots + i
            if s.pointee.tag == tag && s.pointee.rip == site.rip && s.pointee.address == site.address {
                s.pointee.count &+= 1
                return Int(truncatingIfNeeded: s.pointee.count)
            }
            if s.pointee.tag == 0 {
                guard count < capacity else { break }
                s.pointee = Slot(rip: site.rip, address: site.address, tag: tag, count: 1)
                count += 1
                return 1
            }
            i = (i + 1) & mask
        }
        overflow &+= 1
        return 0
    }

    /// How many exits were counted at `site`.
    public func count(of site: ExitSite) -> Int {
        let tag = ExitSiteTable.tag(site)
        var i = start(site.rip, site.address, tag)
        for _ in 0..<ExitSiteTable.probeLimit {
            let s = slots[i]
            if s.tag == 0 { return 0 }
            if s.tag == tag && s.rip == site.rip && s.address == site.address { return Int(truncatingIfNeeded: s.count) }
            i = (i + 1) & mask
        }
        return 0
    }

    /// Every site held with its count, in table order (allocates: not for the exit path).
    public var sites: [(site: ExitSite, count: Int)] {
        var out: [(site: ExitSite, count: Int)] = []
        out.reserveCapacity(count)
        for i in 0...mask where slots[i].tag != 0 {
            let s = slots[i]
            let kind = ExitKind(rawValue: Int((s.tag >> 16) & 0xff)) ?? .unsupported
            let site = ExitSite(rip: s.rip, kind: kind, address: s.address, size: UInt8(truncatingIfNeeded: s.tag >> 8),
                                direction: AccessDirection(rawValue: UInt8(truncatingIfNeeded: s.tag)) ?? .read)
            out.append((site, Int(truncatingIfNeeded: s.count)))
        }
        return out
    }

    /// Forgets every site and the overflow count.
    public func removeAll() {
        slots.update(repeating: Slot(rip: 0, address: 0, tag: 0, count: 0), count: mask + 1)
        count = 0
        overflow = 0
    }
}

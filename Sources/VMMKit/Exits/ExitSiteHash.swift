/// The hashing of exit sites shared by the core's ``ExitSiteTable`` and DMP's
/// hotspot detector: a tag word for the access (kind, size, direction; its top
/// bit marks a used slot) and a seeded multiplicative start index (no SipHash,
/// no allocation).
package enum ExitSiteHash {
    /// The access of `site` as one word, with bit 63 set.
    @_alwaysEmitIntoClient @inline(__always)
    package static func tag(_ site: ExitSite) -> UInt64 {
        1 << 63 | UInt64(truncatingIfNeeded: site.kind.rawValue) << 16 | UInt64(site.size) << 8 | UInt64(site.direction.rawValue)
    }

    /// The first slot to probe for (`rip`, `address`, `tag`) in a table of `mask + 1` slots.
    @_alwaysEmitIntoClient @inline(__always)
    package static func start(rip: UInt64, address: UInt64, tag: UInt64, seed: UInt64, mask: Int) -> Int {
        var h = (rip ^ seed) &* 0x9e37_79b9_7f4a_7c15
        h ^= (address &+ tag) &* 0xc2b2_ae3d_27d4_eb4f
        h ^= h >> 31
        return Int(truncatingIfNeeded: h) & mask
    }
}

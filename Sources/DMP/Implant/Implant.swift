import Synchronization
import VMMKit

/// What the implant's mapping check needs to know about a site: where it is
/// and the paging state and privilege it runs under.
package struct ImplantSite: Hashable, Sendable {
    /// The patched instruction's guest-virtual start.
    package var virtualAddress: UInt64
    /// Its guest-physical start.
    package var physicalAddress: GuestAddress
    /// The privilege level the site's code runs at.
    package var cpl: Int
    /// The site's paging state (CR3, CR0.WP, EFER.NXE, CR4.SMEP/SMAP, mode).
    package var paging: PagingContext
    /// CR4 (protection keys: PKE bit 22, PKS bit 24).
    package var cr4: UInt64

    /// Creates a site description.
    package init(virtualAddress: UInt64, physicalAddress: GuestAddress, cpl: Int, paging: PagingContext, cr4: UInt64 = 0) {
        self.virtualAddress = virtualAddress; self.physicalAddress = physicalAddress
        self.cpl = cpl; self.paging = paging; self.cr4 = cr4
    }

    /// The site of a located instruction.
    package init(_ located: LocatedInstruction) {
        self.init(virtualAddress: located.virtualAddress, physicalAddress: located.physicalAddress,
                  cpl: located.cpl, paging: located.paging, cr4: located.specialRegisters.cr4)
    }
}

/// Where the guest's own page tables map the implant for one site: guest-virtual
/// = guest-physical + ``offset`` (wrapping), for every page that was checked.
package struct ImplantPlacement: Hashable, Sendable {
    /// How the mapping was found.
    package enum Kind: Hashable, Sendable {
        /// Virtual = physical (the guest identity-maps low memory).
        case identity
        /// The site's own virtual-minus-physical offset (a higher-half kernel that maps low memory linearly).
        case siteOffset
    }

    /// Virtual minus physical (two's complement).
    package var offset: UInt64
    /// How it was found.
    package var kind: Kind

    /// Creates a placement.
    package init(offset: UInt64, kind: Kind) { self.offset = offset; self.kind = kind }

    /// The guest-virtual address implant byte `physical` is reached at.
    package func virtualAddress(of physical: GuestAddress) -> UInt64 { physical.rawValue &+ offset }
}

/// The implant (DESIGN.md, "The DMP pipeline", step 5): guest-physical memory
/// reserved for DMP (``DMPConfiguration/implantArea``), handed out by a bump
/// allocator with code and data in separate pages, and the check that the
/// guest's own page tables map it where a site can use it.
///
/// - Code grows up from the area's start, data pages are claimed down from
///   its end; no page ever holds both. Nothing written is freed: a thread
///   preempted inside implanted code may resume there at any time, and a data
///   word an old stub still reads must stay what it was. Only a code range
///   whose plan was refused before anything was written there goes back
///   (``releaseCode(_:)``).
/// - DMP never writes guest page tables: ``placement(for:code:data:memory:)``
///   walks them for the site's CR3 and accepts the implant only where it is
///   already mapped with the permissions the site needs and within ±2 GiB.
/// - ``owner(ofInstructionPointer:)`` maps a RIP inside implanted code back
///   to the site it was implanted for, so exits taken from it (fallbacks) are
///   charged to that site.
///
/// One implant per VM, shared by its vCPUs: every method is thread-safe
/// (allocation and registration under a lock; the owner lookup rejects RIPs
/// outside every registered range without taking it).
package final class Implant: Sendable {
    /// The page size the implant separates code and data by.
    package static let pageSize: UInt64 = 4096
    /// How far implanted code may be from the site (`jmp rel32` both ways) and data from
    /// the code (RIP-relative operands), less a page of margin for instruction lengths.
    package static let reach: UInt64 = (1 << 31) - pageSize

    /// The guest-physical area.
    package let area: GuestRange

    private struct Owner {
        var start: UInt64
        var end: UInt64
        var owner: Int
    }

    private struct State {
        /// Next free code byte; end of the code pages claimed (page-aligned).
        var codeNext: UInt64
        var codeEnd: UInt64
        /// The current data chunk `[dataNext, dataEnd)`; the lowest data page claimed.
        var dataNext: UInt64
        var dataEnd: UInt64
        var dataFloor: UInt64
        /// Registered code ranges (guest-virtual), sorted by start.
        var owners: [Owner] = []
    }

    private let state: Mutex<State>
    private let lowestOwned = Atomic<UInt64>(.max)
    private let highestOwned = Atomic<UInt64>(0)

    /// An implant over `area`, which must be page-aligned and at least two pages.
    package init(area: GuestRange) throws(DMPRefusal) {
        let p = Implant.pageSize
        guard area.start.rawValue % p == 0, area.size % p == 0, area.size >= 2 * p, let end = area.end else {
            throw DMPRefusal(.implant, "implant area \(area) is not page-aligned or smaller than two pages")
        }
        self.area = area
        state = Mutex(State(codeNext: area.start.rawValue, codeEnd: area.start.rawValue,
                            dataNext: end, dataEnd: end, dataFloor: end))
    }

    private static func alignUp(_ v: UInt64, _ a: UInt64) -> UInt64 { (v &+ a &- 1) & ~(a &- 1) }

    private static func validAlignment(_ a: Int) -> Bool { a > 0 && a <= Int(pageSize) && a & (a - 1) == 0 }

    /// Allocates `size` bytes of code (never freed once written: see ``releaseCode(_:)``), aligned to `alignment` (a power of two up to a page).
    /// Code allocations are contiguous: a function copy may span pages.
    package func allocateCode(_ size: Int, alignment: Int = 16) throws(DMPRefusal) -> GuestRange {
        guard size > 0, Implant.validAlignment(alignment) else {
            throw DMPRefusal(.implant, "bad code allocation (\(size) bytes, alignment \(alignment))")
        }
        let r: GuestRange? = state.withLock { s in
            let start = Implant.alignUp(s.codeNext, UInt64(alignment))
            let end = start + UInt64(size)
            let pagesEnd = Implant.alignUp(end, Implant.pageSize)
            guard pagesEnd <= s.dataFloor else { return nil }
            s.codeNext = end
            s.codeEnd = max(s.codeEnd, pagesEnd)
            return GuestRange(start: GuestAddress(start), size: UInt64(size))
        }
        guard let r else { throw DMPRefusal(.implant, "implant full: no room for \(size) bytes of code") }
        return r
    }

    /// Gives back `code`, an allocation of ``allocateCode(_:alignment:)`` that nothing was written into (its plan
    /// was refused before the patch wrote the implant), so the next allocation reuses it. Allocation is a bump
    /// pointer: only the latest code allocation can go back (plans are made one at a time, so a refused plan's
    /// range is the latest); any other is kept. Returns whether it went back.
    @discardableResult
    package func releaseCode(_ code: GuestRange) -> Bool {
        state.withLock { s in
            guard code.size > 0, code.start.rawValue >= area.start.rawValue,
                  code.start.rawValue &+ code.size == s.codeNext else { return false }
            s.codeNext = code.start.rawValue
            // The pages claimed are those up to the highest allocation's end (allocations only grow).
            s.codeEnd = Implant.alignUp(s.codeNext, Implant.pageSize)
            return true
        }
    }

    /// Allocates `size` bytes of data (never freed), aligned to `alignment` (a power of two up to a
    /// page), in pages that hold no code. A chunk that does not fit the current data page(s) starts new ones.
    package func allocateData(_ size: Int, alignment: Int = 8) throws(DMPRefusal) -> GuestRange {
        guard size > 0, Implant.validAlignment(alignment) else {
            throw DMPRefusal(.implant, "bad data allocation (\(size) bytes, alignment \(alignment))")
        }
        let r: GuestRange? = state.withLock { s in
            let start = Implant.alignUp(s.dataNext, UInt64(alignment))
            if start + UInt64(size) <= s.dataEnd {
                s.dataNext = start + UInt64(size)
                return GuestRange(start: GuestAddress(start), size: UInt64(size))
            }
            let bytes = Implant.alignUp(UInt64(size), Implant.pageSize)
            guard s.dataFloor >= bytes, s.dataFloor - bytes >= s.codeEnd else { return nil }
            s.dataFloor -= bytes
            s.dataNext = s.dataFloor + UInt64(size)
            s.dataEnd = s.dataFloor + bytes
            return GuestRange(start: GuestAddress(s.dataFloor), size: UInt64(size))
        }
        guard let r else { throw DMPRefusal(.implant, "implant full: no room for \(size) bytes of data") }
        return r
    }

    /// The range a plan's mapping check probes for data: the area's last page, the first one
    /// ``allocateData(_:alignment:)`` claims. Nothing is allocated, so planning a site that is
    /// then refused (or re-planned after back-off) costs no implant memory.
    package var dataProbe: GuestRange {
        GuestRange(start: GuestAddress(area.start.rawValue + area.size - Implant.pageSize), size: 16)
    }

    /// The code pages claimed so far (from the area's start).
    package var codePages: GuestRange {
        state.withLock { s in GuestRange(start: area.start, size: s.codeEnd - area.start.rawValue) }
    }

    /// The data pages claimed so far (up to the area's end).
    package var dataPages: GuestRange {
        state.withLock { s in GuestRange(start: GuestAddress(s.dataFloor), size: (area.end ?? s.dataFloor) - s.dataFloor) }
    }

    // MARK: the mapping check

    /// Finds where the guest's own page tables map the implant for `site`:
    /// every page of `code` present and executable (NX clear; user for CPL3;
    /// not user for CPL0 under SMEP), every page of `data` present and
    /// writable (user for CPL3; not user for CPL0 under SMAP), each at the
    /// same virtual-minus-physical offset, the code within ±2 GiB of the site
    /// and the data within ±2 GiB of the code. Tries the identity mapping
    /// first, then the site's own offset. DMP never writes page tables: when
    /// neither fits it refuses, saying why for each.
    ///
    /// A few page walks (four reads each): cheap enough to re-run at patch
    /// time and on every fallback exit (page-table writes do not exit; the
    /// guest may have remapped the implant since).
    package func placement(for site: ImplantSite, code: GuestRange, data: [GuestRange], memory: GuestMemory) throws(DMPRefusal) -> ImplantPlacement {
        if site.cr4 & (1 << 22 | 1 << 24) != 0 {
            throw DMPRefusal(.implant, "protection keys are on (CR4.PKE/PKS): the implant's keys cannot be checked")
        }
        for r in [code] + data where !area.contains(r.start, length: r.size) {
            throw DMPRefusal(.implant, "\(r) is not inside the implant area \(area)")
        }
        let siteOffset = site.virtualAddress &- site.physicalAddress.rawValue
        var reasons: [String] = []
        for (offset, kind) in [(UInt64(0), ImplantPlacement.Kind.identity), (siteOffset, .siteOffset)] {
            if kind == .siteOffset && offset == 0 { break }
            let p = ImplantPlacement(offset: offset, kind: kind)
            if let reason = Implant.problem(with: p, site: site, code: code, data: data, memory: memory) {
                reasons.append("\(kind == .identity ? "identity" : "at the site's offset \(hex(offset))"): \(reason)")
            } else {
                return p
            }
        }
        throw DMPRefusal(.implant, "the guest's page tables do not map the implant for this site (" + reasons.joined(separator: "; ") + ")")
    }

    /// Why `placement` does not serve `site`, or `nil` when it does.
    private static func problem(with placement: ImplantPlacement, site: ImplantSite, code: GuestRange, data: [GuestRange],
                                memory: GuestMemory) -> String? {
        let user = site.cpl == 3
        let codeStart = placement.virtualAddress(of: code.start)
        let codeEnd = codeStart &+ code.size
        if !within(codeStart, site.virtualAddress) || !within(codeEnd, site.virtualAddress) {
            return "code at \(hex(codeStart)) is more than 2 GiB from the site at \(hex(site.virtualAddress))"
        }
        if let reason = checkPages(code, placement: placement, access: user ? [.execute, .user] : [.execute], site: site, memory: memory) {
            return reason
        }
        for d in data {
            let v = placement.virtualAddress(of: d.start)
            if !within(v, codeStart) || !within(v &+ d.size, codeEnd) {
                return "data at \(hex(v)) is more than 2 GiB from the code at \(hex(codeStart))"
            }
            if let reason = checkPages(d, placement: placement, access: user ? [.write, .user] : [.write], site: site, memory: memory) {
                return reason
            }
        }
        return nil
    }

    /// Whether `a` and `b` are within ``reach`` of each other.
    private static func within(_ a: UInt64, _ b: UInt64) -> Bool {
        let d = Int64(bitPattern: a &- b)
        return d.magnitude < reach
    }

    /// Walks every page of `range` at its placement for `access`; the reason of the first that fails.
    private static func checkPages(_ range: GuestRange, placement: ImplantPlacement, access: PageAccess, site: ImplantSite,
                                   memory: GuestMemory) -> String? {
        for page in ImplantMapping.pageStarts(of: range) {
            if let why = ImplantMapping.check(virtual: placement.virtualAddress(of: GuestAddress(page)), physical: page,
                                              access: access, paging: site.paging, cpl: site.cpl, memory: memory) {
                return why
            }
        }
        return nil
    }

    // MARK: owners of implanted code

    /// Records that implanted `code`, reached at `placement`, belongs to `owner`
    /// (a site's identifier): exits from it are charged there.
    package func registerOwner(_ owner: Int, code: GuestRange, placement: ImplantPlacement) {
        let start = placement.virtualAddress(of: code.start)
        let end = start &+ code.size
        state.withLock { s in
            let i = s.owners.firstIndex { $0.start > start } ?? s.owners.count
            s.owners.insert(Owner(start: start, end: end, owner: owner), at: i)
        }
        // After the entry exists: a lookup that passes the bounds finds it. (Compare-exchange
        // loops: `Atomic<UInt64>.min` compares as signed in this toolchain and never lowers UInt64.max.)
        var low = lowestOwned.load(ordering: .relaxed)
        while start < low {
            let (done, seen) = lowestOwned.compareExchange(expected: low, desired: start, ordering: .releasing)
            if done { break }
            low = seen
        }
        var high = highestOwned.load(ordering: .relaxed)
        while end > high {
            let (done, seen) = highestOwned.compareExchange(expected: high, desired: end, ordering: .releasing)
            if done { break }
            high = seen
        }
    }

    /// Forgets a ``registerOwner(_:code:placement:)`` whose code was never written (its patch was refused
    /// before the write): its range may be allocated again, to another owner.
    package func unregisterOwner(_ owner: Int, code: GuestRange, placement: ImplantPlacement) {
        let start = placement.virtualAddress(of: code.start)
        let end = start &+ code.size
        state.withLock { s in
            if let i = s.owners.lastIndex(where: { $0.owner == owner && $0.start == start && $0.end == end }) {
                s.owners.remove(at: i)
            }
        }
    }

    /// The owner of the implanted code holding `rip` (guest-virtual), or `nil`.
    /// Allocation-free; RIPs outside every registered range cost two atomic loads.
    @inline(__always)
    package func owner(ofInstructionPointer rip: UInt64) -> Int? {
        guard rip >= lowestOwned.load(ordering: .acquiring), rip < highestOwned.load(ordering: .acquiring) else { return nil }
        return lookUpOwner(rip)
    }

    /// ``owner(ofInstructionPointer:)`` for a RIP within the registered span: the ranges, under the lock.
    @inline(never)
    private func lookUpOwner(_ rip: UInt64) -> Int? {
        state.withLock { s in
            // The last range starting at or below rip.
            var lo = 0, hi = s.owners.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if s.owners[mid].start <= rip { lo = mid + 1 } else { hi = mid }
            }
            var i = lo - 1
            while i >= 0 {
                let o = s.owners[i]
                if rip < o.end { return o.owner }
                // Ranges may overlap only when one placement differs from another; look a little further down.
                if lo - i > 8 { break }
                i -= 1
            }
            return nil
        }
    }
}

import VMMKit

/// How a live patch reaches implant and ring memory through the guest's own
/// page tables: every page its implanted code, its sites' data words and the
/// rings it appends to use, with the access each needs, recorded when the
/// patch is planned (DESIGN.md, DMP step 5).
///
/// Page-table writes do not exit, so the guest may unmap or remap any of these
/// pages at any time. ``problem(in:)`` walks them again for the patch's CR3:
/// at the moment of writing (with every vCPU paused), on every fallback exit
/// from the patch's code, on exits at its sites, whenever another site becomes
/// a candidate, and every 20 ms from the VM's timer. A mapping that no longer
/// holds undoes the patch with the reason.
package struct ImplantMapping: Sendable {
    /// One page: where the code reaches it, where it must land, and how it is used.
    package struct Page: Hashable, Sendable {
        /// The page's guest-virtual address (page-aligned).
        package var virtual: UInt64
        /// The guest-physical page it must map (page-aligned).
        package var physical: UInt64
        /// The access the implanted code makes there.
        package var access: PageAccess
    }

    /// The paging state of the patched site (its CR3 and paging flags).
    package let paging: PagingContext
    /// The privilege level the site's code runs at.
    package let cpl: Int
    /// Every page checked, each once.
    package let pages: [Page]

    /// The pages of `code` (executed), `data` and `rings` (written), reached at `placement`, for `site`.
    package init(site: ImplantSite, placement: ImplantPlacement, code: GuestRange, data: [GuestRange], rings: [GuestRange]) {
        paging = site.paging
        cpl = site.cpl
        let user: PageAccess = site.cpl == 3 ? [.user] : []
        var pages: [Page] = []
        var seen: Set<UInt64> = []
        for (ranges, access) in [([code], PageAccess.execute.union(user)), (data + rings, PageAccess.write.union(user))] {
            for r in ranges {
                for p in ImplantMapping.pageStarts(of: r) where seen.insert(p).inserted {
                    pages.append(Page(virtual: placement.virtualAddress(of: GuestAddress(p)), physical: p, access: access))
                }
            }
        }
        self.pages = pages
    }

    /// The page-aligned guest-physical starts of the pages `range` touches.
    package static func pageStarts(of range: GuestRange) -> [UInt64] {
        guard range.size > 0 else { return [] }
        let size = Implant.pageSize
        var out: [UInt64] = []
        var p = range.start.rawValue & ~(size - 1)
        let last = (range.start.rawValue &+ range.size &- 1) & ~(size - 1)
        while p <= last {
            out.append(p)
            guard p < last else { break }
            p &+= size
        }
        return out
    }

    /// Why the guest's page tables no longer map every page as recorded (not present, another frame, without
    /// execute or write, with the user bit wrong for the site's CPL), or `nil` when they still do.
    /// A page walk per page; allocates only to describe a problem.
    package func problem(in memory: GuestMemory) -> String? {
        problem(in: memory, under: paging)
    }

    /// Why the page tables of `paging` (another vCPU's, say) do not map every page as recorded, or `nil` when they do.
    package func problem(in memory: GuestMemory, under paging: PagingContext) -> String? {
        for p in pages {
            if let why = ImplantMapping.check(virtual: p.virtual, physical: p.physical, access: p.access, paging: paging,
                                              cpl: cpl, memory: memory) {
                return why
            }
        }
        return nil
    }

    /// Why `virtual` does not map `physical` for `access` under `paging`, or `nil` when it does.
    package static func check(virtual: UInt64, physical: UInt64, access: PageAccess, paging: PagingContext, cpl: Int,
                              memory: GuestMemory) -> String? {
        do {
            let t = try memory.translate(virtual, paging: paging, access: access)
            if t.physical.rawValue & ~(Implant.pageSize - 1) != physical {
                return "\(hex(virtual)) maps \(t.physical), not the page \(hex(physical))"
            }
        } catch {
            return "CPL\(cpl) \(access) at \(hex(virtual)): \(error)"
        }
        return nil
    }
}

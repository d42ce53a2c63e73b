import VMMKit

/// A patch in place: what was written, what it guards, how it counts.
package struct AppliedPatch: Sendable {
    /// The one-instruction writes into guest code (entries, retargeted calls).
    package var writes: [CodeWrite]
    /// The guest-physical pages guarded for this patch (patched bytes, a copied function's pages).
    package var guardedPages: [UInt64]
    /// The implanted code's guest-physical range (never freed).
    package var implantCode: GuestRange
    /// The shape, for the report (`instruction stub`, `function copy of f`).
    package var strategy: String
    /// The sites it serves (one for a stub; a function copy may serve several).
    package var sites: [ExitSite]
    /// When the vCPUs resumed with it in place.
    package var appliedAt: ContinuousClock.Instant
    /// For a function copy: the copy (to map exits inside it back to the original's addresses).
    package var copy: FunctionCopy?
    /// The implanted code's guest-virtual start.
    package var codeVirtualStart: UInt64
    /// How the patch reaches the implant and its rings through the guest's page tables (re-walked while it lives).
    package var mapping: ImplantMapping?
    /// For a function copy: the fast paths of the sites it serves, in ``sites`` order (a rebuild serves them again).
    package var grants: [PatchPlanner.Grant] = []
    /// For a rebuilt function copy: the copies it replaced, oldest first, each with its virtual-minus-physical
    /// offset. Never freed (a thread may still run in one); their pads jump on into the next copy.
    package var retired: [(copy: FunctionCopy, offset: UInt64)] = []

    /// The copy, current or retired, holding the implant address `rip`.
    package func copy(holding rip: UInt64) -> FunctionCopy? {
        if let c = copy, rip >= c.address, rip < c.end { return c }
        return retired.first { rip >= $0.copy.address && rip < $0.copy.end }?.copy
    }

    /// The writes that evict the current copy (its pads become jumps to `next`'s corresponding points, or to
    /// the original's), at their guest-physical addresses.
    package func evictionWrites(to next: FunctionCopy? = nil) -> [CodeWrite] {
        guard let copy else { return [] }
        let offset = codeVirtualStart &- implantCode.start.rawValue
        return copy.evictionWrites(to: next).map { w in
            CodeWrite(virtual: w.address, physical: GuestAddress(w.address &- offset), original: w.original, replacement: w.replacement)
        }
    }

    /// Creates a record.
    package init(writes: [CodeWrite], guardedPages: [UInt64], implantCode: GuestRange, strategy: String,
                 sites: [ExitSite], appliedAt: ContinuousClock.Instant, copy: FunctionCopy? = nil, codeVirtualStart: UInt64,
                 mapping: ImplantMapping? = nil) {
        self.writes = writes; self.guardedPages = guardedPages; self.implantCode = implantCode; self.strategy = strategy
        self.sites = sites; self.appliedAt = appliedAt; self.copy = copy; self.codeVirtualStart = codeVirtualStart
        self.mapping = mapping
    }
}

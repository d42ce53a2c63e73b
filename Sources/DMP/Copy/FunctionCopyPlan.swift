import VMMKit
import X86Disassembler

/// A function copy with every way into it that the rules allow (DESIGN.md, DMP step 4):
/// what the lead's patcher writes, in one record per entry.
package struct FunctionCopyPlan: Sendable {
    /// The copy (its bytes go into the implant at `copy.address`; its eviction writes undo its reach).
    package var copy: FunctionCopy
    /// The entries, best first: for a function that returns (with `ret` or through a tail call:
    /// ``FunctionCopy/returnsToCaller``), its start (the entry instruction, else the entry
    /// instruction through dead padding), then redirects on the hot instructions' paths, short jumps through
    /// dead padding at them, then call and tail-call sites; for a function that never returns, the hot paths
    /// come before its start; then, for a function that returns with no entry at its start, the redirects of its
    /// entry block (``FunctionCopy/entryBlockEntries(limit:)``); last, for a hot instruction none of those leads
    /// to, the redirects before its loops (``FunctionCopy/entriesBeforeLoops(for:limit:)``). One entry catches the common case; every entry of
    /// ``compatibleEntries`` may be applied together (each is its own one-instruction patch).
    package var entries: [CopyEntry]

    /// The entries whose writes do not overlap an earlier entry's, in ``entries`` order.
    package var compatibleEntries: [CopyEntry] {
        var taken: [Range<UInt64>] = []
        return entries.filter { e in
            let ranges = e.writes.map(\.range)
            guard !ranges.contains(where: { r in taken.contains { $0.overlaps(r) } }) else { return false }
            taken += ranges
            return true
        }
    }
    /// Why the kinds of entry that are missing could not be used (for the report).
    package var entryRefusals: [DMPRefusal]

    /// Plans the copy of the function holding the `hot` instructions, placed at the guest-virtual `placement`.
    ///
    /// Call it once with any placement to learn the copy's size (`copy.bytes.count`), then again at the place
    /// allocated for it (bodies and relocations depend on the address; the size does only through the bodies).
    /// `entryThroughPadding`: also try the entry instruction of 2 to 4 bytes through dead padding
    /// (``FunctionCopy/entryThroughPadding(in:disassembler:avoiding:)``) when no 5-byte entry instruction exists;
    /// DESIGN.md names the tactic for hot instructions, and its safety argument is the same at the entry.
    /// Refuses when no sized function covers the hot instructions, they lie in different functions, the copy
    /// is refused (``FunctionCopy/init(_:at:rewrites:tables:)``) or no entry into it exists (unless `allowNoEntry`:
    /// then a plan without entries is returned, with the reasons in ``entryRefusals``, for a caller that adds its own).
    /// `promotions` and `accessors`: calls of the function promoted to calls of accessor copies
    /// (``FunctionCopy/init(_:at:rewrites:tables:promotions:accessors:)``); the function is then the one holding
    /// the promoted calls (the first promotion's; a promotion may also name a call inside an accessor), and the
    /// ways to the function's own promoted calls count as hot paths.
    package static func make(hot: [HotRewrite], in image: CodeImage, at placement: UInt64,
                             disassembler: X86Disassembler, usedPadding: [Range<UInt64>] = [],
                             allowNoEntry: Bool = false, entryThroughPadding: Bool = true,
                             promotions: [CallPromotion] = [], accessors: [FunctionCopy.Accessor] = []) throws(DMPRefusal) -> FunctionCopyPlan {
        guard let first = promotions.first.map({ HotRewrite(address: $0.site, bytes: []) }) ?? hot.first else {
            throw DMPRefusal(.plan, "no hot instruction to copy a function for")
        }
        guard let symbol = image.function(containing: first.address) else {
            throw DMPRefusal(.plan, "no sized function symbol covers 0x\(String(first.address, radix: 16))"
                             + (image.symbols.symbols.isEmpty ? " (no symbols: the image is stripped, or DMPConfiguration.use(_:) was not given its LoadedImage)" : ""))
        }
        let function = try image.decode(symbol, disassembler: disassembler)
        if let stray = hot.first(where: { !function.contains($0.address) }) {
            throw DMPRefusal(.plan, "hot instructions in more than one function (0x\(String(stray.address, radix: 16)) is outside \(symbol.name))")
        }
        let copy = try FunctionCopy(function, at: placement, rewrites: hot, tables: image.tables, promotions: promotions, accessors: accessors,
                                    jumpTables: JumpTable.find(in: function, image: image))
        var entries: [CopyEntry] = []
        var refusals: [DMPRefusal] = []
        func attempt(_ make: () throws(DMPRefusal) -> CopyEntry) {
            do throws(DMPRefusal) { entries.append(try make()) } catch { refusals.append(error) }
        }
        // Order: for a function that returns, its start first (its next call runs wholly in the copy, every
        // hot instruction served); for one that never returns, the hot paths first (the thread is in them now).
        var padding = usedPadding
        let pads = image.pads(disassembler: disassembler)
        func start() {
            attempt { () throws(DMPRefusal) in try copy.functionEntry(pads: pads) }
            if entryThroughPadding, !entries.contains(where: { $0.kind == .functionEntry }) {
                attempt { () throws(DMPRefusal) in
                    let e = try copy.entryThroughPadding(in: image, disassembler: disassembler, avoiding: padding)
                    if let p = e.deadPadding { padding.append(p) }
                    return e
                }
            }
        }
        // A tail call returns to the caller too (``FunctionCopy/returnsToCaller``), and so does retpoline code's jump
        // to a return thunk (``BranchThunk``): a jump out of the function.
        let returns = copy.returnsToCaller
        if returns { start() }
        // A promoted call inside an accessor is reached through the promoted call that calls that accessor.
        let paths = hot.map(\.address) + promotions.map(\.site).filter { function.contains($0) }
        for h in paths { entries += copy.pathEntries(for: h) }
        for h in paths {
            guard let k = function.index(at: h), (2...4).contains(function.instructions[k].length) else { continue }
            attempt { () throws(DMPRefusal) in
                let e = try copy.deadPaddingEntry(hot: h, in: image, disassembler: disassembler, avoiding: padding)
                if let p = e.deadPadding { padding.append(p) }
                return e
            }
        }
        if !returns { start() }
        let callers = image.callSites(to: function.start, disassembler: disassembler)
        for site in callers {
            attempt { () throws(DMPRefusal) in try copy.callSiteEntry(site) }
        }
        if callers.isEmpty { refusals.append(DMPRefusal(.plan, "no direct call or tail call of \(symbol.name) in the image")) }
        // A function that returns with no way in at its start (reached through pointers, a short first
        // instruction, no padding): its entry block runs on every call, whichever paths its hot instructions lie
        // on; the redirects found on those paths may lie on one that never runs.
        let startKinds: Set<CopyEntry.Kind> = [.functionEntry, .entryThroughPadding, .callSite, .tailCallSite]
        if returns, !entries.contains(where: { startKinds.contains($0.kind) }) { entries += copy.entryBlockEntries() }
        // A hot path no entry so far leads to (none at all, or only redirects after its loop, which serve a
        // sibling further down): the code before its loops (a function whose loops hold only short instructions).
        let reached = PatchPlanner.reachable(in: function, from: entries.map { startKinds.contains($0.kind) ? function.start : $0.site },
                                             jumpTables: copy.jumpTables)
        let unreached = paths.filter { !reached.contains($0) }
        var before: [CopyEntry] = []
        for h in unreached { before += copy.entriesBeforeLoops(for: h) }
        entries += before
        if !unreached.isEmpty, before.isEmpty {
            refusals.append(DMPRefusal(.plan, "no instruction of 5 bytes or more before the hot loops"))
        }
        // No write over a pad the guest rewrites itself (ftrace's NOPs, patchable entries).
        entries = entries.filter { e in
            guard let w = e.writes.first(where: { w in pads.contains { $0.overlaps(w.range) } }) else { return true }
            refusals.append(DMPRefusal(.plan, "an entry at \(function.location(e.site)) would write over a pad the guest's tables record "
                                       + "(at 0x\(String(w.address, radix: 16)))"))
            return false
        }
        var sites: Set<UInt64> = []
        entries = entries.filter { sites.insert($0.site).inserted }
        guard !entries.isEmpty || allowNoEntry else {
            throw DMPRefusal(.plan, "no way into the copy of \(symbol.name): " + refusals.map(\.reason).joined(separator: "; "))
        }
        return FunctionCopyPlan(copy: copy, entries: entries, entryRefusals: refusals)
    }
}

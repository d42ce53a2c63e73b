/// The memory-slot manager: owns the slot numbers and the guest-physical
/// layout of the slots, and guards pages (``protect(_:)``/``unprotect(_:)``)
/// while the VM runs.
///
/// At VM creation RAM is carved into slots of ``granularity`` bytes (aligned
/// to their guest-physical address), so that a later change deletes and
/// re-creates only the small slots it touches: KVM cannot change a live
/// slot's flags, and on shadow-paging hosts deleting a slot throws away the
/// guest's mappings of that slot (of all slots, unless the zap-all quirk is
/// disabled, which the manager does where KVM allows it). ``isolate(_:)``
/// gives a range (the loaded image's code) slots of its own.
///
/// A protected page run is its own read-only slot; guest reads and
/// instruction fetches are served from memory, guest writes exit as MMIO
/// writes, which the VM's built-in guard handler applies and reports (see
/// ``PageGuardListener``). Unprotecting merges the slots back.
///
/// Changes made while the VM runs pause every vCPU (``VirtualMachine/pauseAll()``),
/// harvest the dirty logs of the slots to be deleted, delete and re-create the
/// slots of one request in one batch, update ``GuestMemory/protectedRanges``
/// and resume. They may be made from any thread, including a vCPU's exit
/// handler (a ``PageGuardListener`` may unprotect), but not from inside a
/// device's `read`/`write` (devices run under locks other vCPUs may wait for).
public final class MemorySlots: @unchecked Sendable {
    /// One memory slot as the manager registered it.
    public struct Slot: Hashable, Sendable, CustomStringConvertible {
        /// The slot number.
        public var number: UInt32
        /// The guest-physical range.
        public var range: GuestRange
        /// Whether the slot is read-only for the guest (a guarded run, or a read-only region).
        public var readOnly: Bool

        /// `slot N [start, end) ro`.
        public var description: String { "slot \(number) \(range)\(readOnly ? " ro" : "")" }
    }

    /// The slot size RAM is carved into (0: one slot per region).
    public let granularity: UInt64
    /// Whether `KVM_X86_QUIRK_SLOT_ZAP_ALL` was disabled (a slot delete then
    /// zaps only that slot's mappings).
    public let zapAllQuirkDisabled: Bool
    /// The most slots the hypervisor allows (`KVM_CAP_NR_MEMSLOTS`).
    public let slotLimit: Int
    /// Whether slots log dirty pages (``VMConfiguration/logDirtyPages``).
    public let logsDirtyPages: Bool

    private let backend: any VMBackend
    private let memory: GuestMemory
    package weak var gate: (any MemorySlotGate)?
    private let lock = ConditionLock()
    /// Cut points (page aligned) inside RAM regions; region edges are implicit.
    private var cuts: Set<UInt64> = []
    /// Guarded page runs, sorted and merged.
    private var protectedRuns: [GuestRange] = []
    /// The registered slots, sorted by start.
    private var current: [Slot] = []
    /// A change failed and could not be rolled back: the registered slots may leave holes in RAM, so the next
    /// change registers the whole layout again even if it changes no guard.
    private var needsRepair = false
    private var freeNumbers: [UInt32] = []
    private var nextNumber: UInt32 = 0
    private var savedDirty: Set<UInt64> = []
    private var emulationFailureExitsEnabled = false

    /// The page size slots are carved in.
    public static let pageSize: UInt64 = 4096
    /// The most slots carving creates up front: a larger RAM gets a coarser granularity.
    public static let carvedSlotBudget = 4096

    /// Creates the manager and registers the initial slots for `memory`.
    ///
    /// - Parameters:
    ///   - granularity: the carving size (rounded up to a power of two of at
    ///     least a page, and coarsened so that RAM needs at most
    ///     ``carvedSlotBudget`` slots); 0 registers one slot per region.
    ///   - logDirtyPages: set `KVM_MEM_LOG_DIRTY_PAGES` on RAM slots.
    package init(backend: any VMBackend, memory: GuestMemory, granularity: UInt64, logDirtyPages: Bool) throws(MemorySlotError) {
        self.backend = backend
        self.memory = memory
        self.logsDirtyPages = logDirtyPages
        let reported = Int(backend.checkExtension(Int32(KVMCapability.nrMemslots)))
        let limit = reported >= 32 ? reported : 32 // KVM's historical minimum when the capability is absent
        self.slotLimit = limit
        var g: UInt64 = 0
        if granularity > 0 {
            g = MemorySlots.pageSize
            while g < granularity, g < 1 << 40 { g <<= 1 }
            let ram = memory.regions.filter { !$0.readOnly }.reduce(UInt64(0)) { $0 + $1.range.size }
            let budget = UInt64(min(MemorySlots.carvedSlotBudget, limit / 2))
            while ram / g > budget { g <<= 1 }
        }
        self.granularity = g
        // Disable zap-all-on-delete only when RAM is carved: on one big slot it makes a delete slower.
        var disabled = false
        let quirk = KVMCapability.x86QuirkSlotZapAll
        if g > 0, UInt64(UInt32(bitPattern: backend.checkExtension(Int32(KVMCapability.disableQuirks2)))) & quirk != 0 {
            disabled = (try? backend.enableCapability(KVMCapability.disableQuirks2, args: [quirk])) != nil
        }
        self.zapAllQuirkDisabled = disabled
        if g > 0 {
            for r in memory.regions where !r.readOnly {
                var a = (r.range.start.rawValue / g + 1) * g
                while let end = r.range.end, a < end { cuts.insert(a); a += g }
            }
        }
        lock.lock()
        defer { lock.unlock() }
        try apply(target: layout(cuts: cuts, protected: []), protected: [])
    }

    // MARK: Reading the layout

    /// The registered slots, sorted by guest-physical address.
    public var slots: [Slot] { lock.withLock { current } }

    /// The guarded page runs (the same as ``GuestMemory/protectedRanges``).
    public var protectedRanges: [GuestRange] { lock.withLock { protectedRuns } }

    /// The slot holding `address`, if any.
    public func slot(containing address: GuestAddress) -> Slot? {
        lock.withLock {
            let i = current.partitionPoint { $0.range.start > address } - 1
            return i >= 0 && current[i].range.contains(address) ? current[i] : nil
        }
    }

    // MARK: Changing the layout

    /// Guards the pages of `ranges` (each rounded out to whole pages): each
    /// run of guarded pages becomes a read-only slot of its own. All ranges go
    /// in one batch (one pause). Pages already guarded stay guarded; a request
    /// that changes nothing touches no slot.
    public func protect(_ ranges: [GuestRange]) throws(MemorySlotError) {
        let pages = try validated(ranges)
        try change { cuts, runs in runs = MemorySlots.union(runs, pages) }
    }

    /// Guards the pages of one range (see ``protect(_:)``).
    public func protect(_ range: GuestRange) throws(MemorySlotError) { try protect([range]) }

    /// Lifts the guard from the pages of `ranges` (rounded out to whole pages)
    /// and merges their slots back. Pages not guarded are ignored.
    public func unprotect(_ ranges: [GuestRange]) throws(MemorySlotError) {
        let pages = try validated(ranges)
        try change { cuts, runs in runs = MemorySlots.subtract(runs, pages) }
    }

    /// Lifts the guard from the pages of one range (see ``unprotect(_:)``).
    public func unprotect(_ range: GuestRange) throws(MemorySlotError) { try unprotect([range]) }

    /// Gives `range` (rounded out to whole pages) slots of its own: no slot
    /// then holds both pages of the range and pages outside it, so guarding a
    /// page of the range deletes only slots of the range. Loaders call it for
    /// the image's code.
    public func isolate(_ range: GuestRange) throws(MemorySlotError) {
        let pages = try validated([range])
        try change { cuts, _ in
            for p in pages {
                cuts.insert(p.start.rawValue)
                cuts.insert(p.start.rawValue + p.size)
            }
        }
    }

    /// Returns the pages written since the last call (by the guest, through
    /// dirty logging, and guest stores into guarded pages, which the guard
    /// handler applied) and clears the logs, including pages whose slots were
    /// re-created in between. Empty unless ``logsDirtyPages``.
    public func dirtyPages() throws(MemorySlotError) -> [GuestAddress] {
        guard logsDirtyPages else { return [] }
        lock.lock()
        defer { lock.unlock() }
        for s in current where !s.readOnly { try harvest(s) }
        let pages = savedDirty.sorted().map { GuestAddress($0) }
        savedDirty = []
        return pages
    }

    /// Records a guest store into a guarded page, which the guard handler
    /// applied from user space, as dirty: KVM's log never sees it (the slot is
    /// read-only), so without this ``dirtyPages()`` would miss the page.
    package func noteGuestWrite(_ range: GuestRange) {
        guard logsDirtyPages, range.size > 0, let end = range.end else { return }
        lock.lock()
        defer { lock.unlock() }
        var page = range.start.rawValue & ~(MemorySlots.pageSize - 1)
        while page < end {
            savedDirty.insert(page)
            page &+= MemorySlots.pageSize
            if page == 0 { break }
        }
    }

    /// Enables `KVM_CAP_EXIT_ON_EMULATION_FAILURE` once, where KVM has it, so
    /// that an instruction KVM cannot emulate (for example a VEX store into a
    /// guarded page) exits to user space instead of raising #UD in the guest.
    private func enableEmulationFailureExits() {
        guard !emulationFailureExitsEnabled else { return }
        emulationFailureExitsEnabled = true
        if backend.checkExtension(Int32(KVMCapability.exitOnEmulationFailure)) > 0 {
            try? backend.enableCapability(KVMCapability.exitOnEmulationFailure, args: [1])
        }
    }

    /// Rounds each range out to pages and checks it lies in one RAM region.
    private func validated(_ ranges: [GuestRange]) throws(MemorySlotError) -> [GuestRange] {
        var out: [GuestRange] = []
        out.reserveCapacity(ranges.count)
        for r in ranges {
            guard r.size > 0 else { throw .emptyRange(r) }
            guard let end = r.end else { throw .overflow(r) }
            let start = r.start.rawValue & ~(MemorySlots.pageSize - 1)
            let (up, o) = end.addingReportingOverflow(MemorySlots.pageSize - 1)
            guard !o else { throw .overflow(r) }
            let pages = GuestRange(start: GuestAddress(start), size: (up & ~(MemorySlots.pageSize - 1)) - start)
            guard let region = memory.region(containing: pages.start), !region.readOnly,
                  region.range.contains(pages.start, length: pages.size) else { throw .notRAM(r) }
            out.append(pages)
        }
        return MemorySlots.union([], out)
    }

    /// Computes a new layout with `edit` and registers it: directly when no
    /// vCPU can be in `KVM_RUN`, else with every vCPU paused.
    private func change(_ edit: (inout Set<UInt64>, inout [GuestRange]) -> Void) throws(MemorySlotError) {
        // A VM that stops between the check and the pause is retried as not running.
        for _ in 0..<4 {
            lock.lock()
            var c = cuts, runs = protectedRuns
            edit(&c, &runs)
            if c == cuts && runs == protectedRuns && !needsRepair { lock.unlock(); return }
            if gate?.vcpusMayRun != true {
                // VirtualMachine.start() takes this lock, so no vCPU can start meanwhile.
                defer { lock.unlock() }
                try commit(cuts: c, runs: runs)
                return
            }
            lock.unlock()
            guard let gate, gate.pauseForSlotChange() else {
                if self.gate?.vcpusMayRun == true { throw .vmStopping }
                continue
            }
            defer { gate.resumeAfterSlotChange() }
            lock.lock()
            defer { lock.unlock() }
            // Recompute from the state now: another change may have landed while we waited.
            var c2 = cuts, runs2 = protectedRuns
            edit(&c2, &runs2)
            try commit(cuts: c2, runs: runs2)
            return
        }
        throw .vmStopping
    }

    /// Registers the layout for `cuts` and `runs` (lock held, vCPUs out of the guest).
    private func commit(cuts newCuts: Set<UInt64>, runs: [GuestRange]) throws(MemorySlotError) {
        if !runs.isEmpty { enableEmulationFailureExits() }
        try apply(target: layout(cuts: newCuts, protected: runs), protected: runs)
        cuts = newCuts
    }

    /// The slots (without numbers) that `cuts` and `protected` call for, sorted.
    private func layout(cuts: Set<UInt64>, protected: [GuestRange]) -> [(range: GuestRange, readOnly: Bool)] {
        var out: [(range: GuestRange, readOnly: Bool)] = []
        let sortedCuts = cuts.sorted()
        for r in memory.regions {
            guard !r.readOnly, let end = r.range.end else {
                out.append((r.range, r.readOnly))
                continue
            }
            // Boundaries: region edges, cuts inside the region, edges of protected runs.
            var edges: [UInt64] = [r.range.start.rawValue]
            var ci = sortedCuts.partitionPoint { $0 > r.range.start.rawValue }
            while ci < sortedCuts.count, sortedCuts[ci] < end { edges.append(sortedCuts[ci]); ci += 1 }
            for p in protected where p.overlaps(r.range) {
                edges.append(max(p.start.rawValue, r.range.start.rawValue))
                edges.append(min(p.start.rawValue + p.size, end))
            }
            edges.append(end)
            edges = Array(Set(edges)).sorted()
            var pi = 0
            for i in 0..<(edges.count - 1) {
                let piece = GuestRange(start: GuestAddress(edges[i]), size: edges[i + 1] - edges[i])
                while pi < protected.count, protected[pi].start.rawValue + protected[pi].size <= piece.start.rawValue { pi += 1 }
                let ro = pi < protected.count && protected[pi].overlaps(piece)
                out.append((piece, ro))
            }
        }
        return out
    }

    /// Moves the registered slots to `target`: harvests the dirty logs of the
    /// slots to delete, deletes them, creates the new ones (numbers reused),
    /// and rolls back on failure. Lock held; vCPUs out of the guest.
    private func apply(target: [(range: GuestRange, readOnly: Bool)], protected: [GuestRange]) throws(MemorySlotError) {
        struct Key: Hashable { var start: UInt64; var size: UInt64; var readOnly: Bool }
        let wanted = Set(target.map { Key(start: $0.range.start.rawValue, size: $0.range.size, readOnly: $0.readOnly) })
        let have = Dictionary(current.map { (Key(start: $0.range.start.rawValue, size: $0.range.size, readOnly: $0.readOnly), $0) },
                              uniquingKeysWith: { a, _ in a })
        let toDelete = current.filter { !wanted.contains(Key(start: $0.range.start.rawValue, size: $0.range.size, readOnly: $0.readOnly)) }
        let toCreate = target.filter { have[Key(start: $0.range.start.rawValue, size: $0.range.size, readOnly: $0.readOnly)] == nil }
        let needed = current.count - toDelete.count + toCreate.count
        guard needed <= slotLimit else { throw .outOfSlots(needed: needed, limit: slotLimit) }
        if toDelete.isEmpty && toCreate.isEmpty {
            memory.setProtected(protected)
            needsRepair = false
            return
        }
        // While slots change, host writes to pages guarded before or after
        // the change are reported (a page becomes read-only for the guest the
        // moment its slot is created, before the final view is set).
        memory.setProtected(MemorySlots.union(protectedRuns, protected))
        // 1. Dirty logs first: a deleted slot's log is gone.
        for s in toDelete where !s.readOnly {
            do throws(MemorySlotError) { try harvest(s) } catch {
                memory.setProtected(protectedRuns)
                throw error
            }
        }
        // 2. Delete, 3. create; undo what was done when a call fails.
        var deleted: [Slot] = [], created: [Slot] = []
        var numbers = freeNumbers
        let firstUnused = nextNumber
        func number() -> UInt32 {
            if let n = numbers.popLast() { return n }
            defer { nextNumber += 1 }
            return nextNumber
        }
        do throws(BackendError) {
            for s in toDelete {
                try backend.setUserMemoryRegion(MemorySlot(slot: s.number, range: GuestRange(start: s.range.start, size: 0), host: nil))
                deleted.append(s)
                numbers.append(s.number)
            }
            numbers.sort(by: >) // reuse the lowest numbers first
            for t in toCreate {
                let s = Slot(number: number(), range: t.range, readOnly: t.readOnly)
                try register(s)
                created.append(s)
            }
        } catch {
            let (rolledBack, stillCreated, stillDeleted) = rollBack(deleted: deleted, created: created)
            if rolledBack {
                // The numbers handed out for this change are free again.
                nextNumber = firstUnused
                memory.setProtected(protectedRuns)
            } else {
                // Record what the hypervisor has now (what the partial rollback undid is undone); every number
                // below nextNumber not in use is free. RAM may have holes: the next change repairs the layout.
                needsRepair = true
                let gone = Set(stillDeleted.map(\.number))
                current = (current.filter { !gone.contains($0.number) } + stillCreated).sorted { $0.range.start < $1.range.start }
                let used = Set(current.map(\.number))
                freeNumbers = (0..<nextNumber).filter { !used.contains($0) }.sorted(by: >)
                protectedRuns = MemorySlots.union([], current.filter { $0.readOnly && memory.region(containing: $0.range.start)?.readOnly == false }.map(\.range))
                memory.setProtected(protectedRuns)
            }
            throw .backend(error, rolledBack: rolledBack)
        }
        let gone = Set(deleted.map(\.number))
        current = (current.filter { !gone.contains($0.number) } + created).sorted { $0.range.start < $1.range.start }
        freeNumbers = numbers
        protectedRuns = protected
        memory.setProtected(protected)
        needsRepair = false
    }

    /// Registers one slot with the hypervisor.
    private func register(_ s: Slot) throws(BackendError) {
        guard let region = memory.region(containing: s.range.start) else {
            throw BackendError("KVM_SET_USER_MEMORY_REGION", errno: .invalidArgument, detail: "\(s.range) has no backing")
        }
        var flags: MemorySlotFlags = s.readOnly ? .readOnly : []
        if logsDirtyPages && !region.readOnly { flags.insert(.logDirtyPages) }
        let host = region.host + Int(s.range.start.rawValue - region.range.start.rawValue)
        try backend.setUserMemoryRegion(MemorySlot(slot: s.number, flags: flags, range: s.range, host: host))
    }

    /// Undoes a partly applied change: deletes the slots created, re-creates the ones deleted. Returns whether
    /// all of it was undone, and the slots still created and still deleted (what the hypervisor has).
    private func rollBack(deleted: [Slot], created: [Slot]) -> (done: Bool, stillCreated: [Slot], stillDeleted: [Slot]) {
        var stillCreated: [Slot] = []
        for s in created {
            do { try backend.setUserMemoryRegion(MemorySlot(slot: s.number, range: GuestRange(start: s.range.start, size: 0), host: nil)) }
            catch { stillCreated.append(s) }
        }
        // A deleted slot overlapping one still created cannot come back (KVM refuses overlaps).
        guard stillCreated.isEmpty else { return (false, stillCreated, deleted) }
        var stillDeleted: [Slot] = []
        for s in deleted {
            do { try register(s) } catch { stillDeleted.append(s) }
        }
        return (stillDeleted.isEmpty, [], stillDeleted)
    }

    /// Folds a slot's dirty log into the saved pages.
    private func harvest(_ s: Slot) throws(MemorySlotError) {
        guard logsDirtyPages else { return }
        let pages = Int(s.range.size / MemorySlots.pageSize)
        let bitmap: [UInt64]
        do { bitmap = try backend.dirtyLog(slot: s.number, pageCount: pages) } catch { throw .backend(error, rolledBack: true) }
        for (w, word) in bitmap.enumerated() where word != 0 {
            for b in 0..<64 where word & (1 << UInt64(b)) != 0 {
                let i = w * 64 + b
                guard i < pages else { break }
                savedDirty.insert(s.range.start.rawValue + UInt64(i) * MemorySlots.pageSize)
            }
        }
    }

    /// Lets ``VirtualMachine/start()`` start vCPUs only between slot changes.
    package func withLayoutLocked<R>(_ body: () throws -> R) rethrows -> R { try lock.withLock(body) }

    // MARK: Range sets

    /// The union of two sets of page ranges, sorted and merged.
    static func union(_ a: [GuestRange], _ b: [GuestRange]) -> [GuestRange] {
        let all = (a + b).sorted { $0.start < $1.start }
        var out: [GuestRange] = []
        for r in all {
            if let last = out.last, r.start.rawValue <= last.start.rawValue + last.size {
                let end = max(last.start.rawValue + last.size, r.start.rawValue + r.size)
                out[out.count - 1].size = end - last.start.rawValue
            } else {
                out.append(r)
            }
        }
        return out
    }

    /// `a` minus `b` (both sorted and merged).
    static func subtract(_ a: [GuestRange], _ b: [GuestRange]) -> [GuestRange] {
        var out: [GuestRange] = []
        for r in a {
            var pieces = [r]
            for cut in b where cut.overlaps(r) {
                pieces = pieces.flatMap { p -> [GuestRange] in
                    guard p.overlaps(cut) else { return [p] }
                    var keep: [GuestRange] = []
                    let pEnd = p.start.rawValue + p.size, cEnd = cut.start.rawValue + cut.size
                    if cut.start > p.start { keep.append(GuestRange(start: p.start, size: cut.start.rawValue - p.start.rawValue)) }
                    if cEnd < pEnd { keep.append(GuestRange(start: GuestAddress(cEnd), size: pEnd - cEnd)) }
                    return keep
                }
            }
            out += pieces
        }
        return out
    }
}

extension Array {
    /// The index of the first element for which `belongs` is true, assuming
    /// the elements for which it is true come last (a binary search).
    func partitionPoint(_ belongs: (Element) -> Bool) -> Int {
        var lo = 0, hi = count
        while lo < hi {
            let mid = (lo + hi) >> 1
            if belongs(self[mid]) { hi = mid } else { lo = mid + 1 }
        }
        return lo
    }
}

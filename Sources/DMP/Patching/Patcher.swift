import Synchronization
import VMMKit

/// Writes patches into a running guest and takes them out again, with every
/// vCPU paused (DESIGN.md, DMP step 4 "Writing" and step 6).
///
/// Each call: pause every vCPU (their pending accesses complete on their own
/// threads), refuse if any vCPU's RIP is strictly inside bytes to be written
/// (or cannot be read), check the bytes are still the expected ones, write,
/// guard or unguard pages, serialize, resume (paused vCPUs serialize before
/// they re-enter the guest).
///
/// When an ioctl fails: a patch is applied whole or not at all (a failed guard
/// writes nothing; a failed write restores what was written); an unpatch that
/// cannot check the vCPUs changes nothing. A page no patch relies on any more
/// whose guard cannot be lifted (the slot change failed) is *stranded*: it
/// stays listed in ``strandedPages`` and unguarding it is tried again at every
/// later apply and revert and by ``retryStrandedPages()``.
package final class Patcher: @unchecked Sendable {
    private unowned let vm: VirtualMachine
    /// Guarded pages and how many patches rely on each.
    private let guardCounts = Mutex<[UInt64: Int]>([:])
    /// Pages no patch relies on whose guard could not be lifted yet.
    private let stranded = Mutex<Set<UInt64>>([])

    /// Creates a patcher for `vm`.
    package init(vm: VirtualMachine) { self.vm = vm }

    /// Tests only: called with every vCPU paused just before ``apply(_:guarding:implant:verify:)`` runs its
    /// checks, standing in for another vCPU or a device changing guest memory between the plan and the write;
    /// the closure it returns runs after the checks (and the write, if any), still paused. Set before the VM runs.
    package var beforeWriteChecks: (@Sendable () -> (@Sendable () -> Void))?

    /// The pages DMP guards now.
    package var guardedPages: [UInt64] { guardCounts.withLock { $0.keys.sorted() } }

    /// Pages no patch relies on any more that are still guarded because lifting the guard failed.
    package var strandedPages: [UInt64] { stranded.withLock { $0.sorted() } }

    /// Applies `writes` (all or none; each finds ``CodeWrite/expected`` there) and guards `pages` (page-aligned
    /// guest-physical addresses; each use counted). `implant` bytes (code and data the patch jumps to, in memory
    /// the guest does not execute yet) are written first. `releasing`: pages of a patch this one replaces (a
    /// rebuilt function copy), one use each dropped after the writes, in the same pause.
    /// `verify` runs first with every vCPU paused: the checks that must hold at the
    /// moment of writing (the guest's mappings, the code the plan was made from). `willWrite` runs once the
    /// checks have passed, before the first byte is written (a refusal before it wrote nothing).
    /// - Returns: the nanoseconds the vCPUs were paused.
    @discardableResult
    package func apply(_ writes: [CodeWrite], guarding pages: [UInt64], implant: [(GuestAddress, [UInt8])] = [],
                       releasing: [UInt64] = [], willWrite: () -> Void = {},
                       verify: () throws(DMPRefusal) -> Void = {}) throws(DMPRefusal) -> UInt64 {
        try applyWrites(writes, guarding: pages, implant: implant, releasing: releasing, willWrite: willWrite,
                        verify: verify, yieldingTo: false).paused
    }

    /// ``apply(_:guarding:implant:releasing:willWrite:verify:)``; with `yieldingTo`, a vCPU inside bytes to write
    /// is returned (nothing written) instead of refused.
    private func applyWrites(_ writes: [CodeWrite], guarding pages: [UInt64], implant: [(GuestAddress, [UInt8])],
                             releasing: [UInt64], willWrite: () -> Void, verify: () throws(DMPRefusal) -> Void,
                             yieldingTo yielding: Bool) throws(DMPRefusal) -> (paused: UInt64, busy: VCPUInside?) {
        var busy: VCPUInside?
        let paused = try withPausedVCPUs { () throws(DMPRefusal) in
            let restore = beforeWriteChecks?()
            defer { restore?() }
            _ = unguard([])
            try verify()
            if let inside = try vcpuInside(writes) {
                guard yielding else { throw DMPRefusal(.patch, inside.description) }
                busy = inside
                return
            }
            for w in writes {
                guard w.original.count == w.replacement.count else {
                    throw DMPRefusal(.patch, "internal: a write of \(w.replacement.count) bytes over \(w.original.count)")
                }
                let now = try? vm.memory.readBytes(at: w.physical, count: w.original.count)
                guard now == w.expected else {
                    throw DMPRefusal(.patch, "the code at \(hex(w.virtual)) changed since it was planned")
                }
            }
            willWrite()
            for (a, b) in implant {
                do { try vm.memory.writeAsGuardOwner(b, at: a) } catch {
                    throw DMPRefusal(.implant, "cannot write the implant at \(a): \(error)")
                }
            }
            let newPages = addGuards(pages)
            do throws(MemorySlotError) { try vm.slots.protect(Patcher.ranges(newPages)) } catch {
                // Rolled back, nothing is guarded; otherwise whatever the failed change left guarded is stranded.
                if case .backend(_, rolledBack: false) = error { stranded.withLock { $0.formUnion(newPages) } }
                if let failure = unguard(removeGuards(pages)) { strandedNote = failure }
                throw DMPRefusal(.guard, "cannot guard \(newPages.map(hex)): \(error); nothing was written")
            }
            var done: [CodeWrite] = []
            for w in writes {
                do { try vm.memory.writeAsGuardOwner(w.replacement, at: w.physical) } catch {
                    for d in done.reversed() { try? vm.memory.writeAsGuardOwner(d.expected, at: d.physical) }
                    if let failure = unguard(removeGuards(pages)) { strandedNote = failure }
                    throw DMPRefusal(.patch, "cannot write \(hex(w.virtual)): \(error)")
                }
                done.append(w)
            }
            if let failure = unguard(removeGuards(releasing)) { strandedNote = failure }
            VirtualMachine.serializeCallingThread()
        }
        return (paused, busy)
    }

    /// Why the last ``apply(_:guarding:implant:releasing:verify:)`` or ``revert(_:unguarding:evicting:)`` left pages
    /// stranded (``strandedPages``), if it did; read and cleared by the middleware to log it.
    package func takeStrandedNote() -> String? { strandedNoteLock.withLock { n in defer { n = nil }; return n } }
    private let strandedNoteLock = Mutex<String?>(nil)
    private var strandedNote: String? {
        get { strandedNoteLock.withLock { $0 } }
        set { strandedNoteLock.withLock { $0 = newValue } }
    }

    /// Tries again to lift the guards of ``strandedPages`` (with every vCPU paused when the VM runs). Returns why
    /// it failed, if it did (the pages stay stranded).
    package func retryStrandedPages() -> String? {
        guard !stranded.withLock({ $0.isEmpty }) else { return nil }
        var failure: String?
        _ = try? withPausedVCPUs { () throws(DMPRefusal) in failure = unguard([]) }
        return failure
    }

    /// Restores the original bytes of `writes` where the patch's bytes are still
    /// there (a guest may have overwritten them since: its bytes stand) and drops
    /// one use of each of `pages`, unguarding pages no patch relies on any more. `evicting`: writes into
    /// implanted code applied in the same pause where their ``CodeWrite/expected`` bytes are still there (a
    /// function copy's pads turned into jumps back to the original).
    /// - Returns: how many writes were restored.
    @discardableResult
    package func revert(_ writes: [CodeWrite], unguarding pages: [UInt64], evicting: [CodeWrite] = []) throws(DMPRefusal) -> Int {
        try revertWrites(writes, unguarding: pages, evicting: evicting, yieldingTo: false).restored
    }

    /// ``revert(_:unguarding:evicting:)``; with `yieldingTo`, a vCPU inside bytes to write is returned (nothing
    /// written) instead of refused.
    private func revertWrites(_ writes: [CodeWrite], unguarding pages: [UInt64], evicting: [CodeWrite],
                              yieldingTo yielding: Bool) throws(DMPRefusal) -> (restored: Int, busy: VCPUInside?) {
        var restored = 0
        var busy: VCPUInside?
        try withPausedVCPUs { () throws(DMPRefusal) in
            if let inside = try vcpuInside(writes + evicting) {
                guard yielding else { throw DMPRefusal(.patch, inside.description) }
                busy = inside
                return
            }
            _ = unguard([])
            for w in evicting {
                guard let now = try? vm.memory.readBytes(at: w.physical, count: w.replacement.count), now == w.expected else { continue }
                try? vm.memory.writeAsGuardOwner(w.replacement, at: w.physical)
            }
            for w in writes {
                guard let now = try? vm.memory.readBytes(at: w.physical, count: w.replacement.count), now == w.replacement else { continue }
                do { try vm.memory.writeAsGuardOwner(w.original, at: w.physical) } catch {
                    throw DMPRefusal(.patch, "cannot restore \(hex(w.virtual)): \(error)")
                }
                restored += 1
            }
            // The patch is out whether or not its guards can be lifted now: a guard that stays costs exits on
            // writes into the page (applied as ever), never correctness; it is stranded and lifted later.
            if let failure = unguard(removeGuards(pages)) { strandedNote = failure }
            VirtualMachine.serializeCallingThread()
        }
        return (restored, busy)
    }

    /// Takes `writes` out for an A/B trial's off phase (``RateTrial``): the original bytes go back where the
    /// patch's bytes are still there; guards and implanted code stay (a thread inside the code finishes there).
    /// - Returns: ``PatchSwitch/busy(_:)``, with nothing written, when a vCPU is paused inside bytes to write (the
    ///   switch can be tried again later); ``PatchSwitch/switched`` otherwise. Other failures throw.
    package func suspend(_ writes: [CodeWrite]) throws(DMPRefusal) -> PatchSwitch {
        try revertWrites(writes, unguarding: [], evicting: [], yieldingTo: true).busy.map(PatchSwitch.busy) ?? .switched
    }

    /// Puts `writes` back after ``suspend(_:)``: each must find the guest's original bytes (all or none).
    /// - Returns: as ``suspend(_:)``.
    package func resume(_ writes: [CodeWrite]) throws(DMPRefusal) -> PatchSwitch {
        let writes = writes.map { w in
            var w = w
            w.current = nil
            return w
        }
        return try applyWrites(writes, guarding: [], implant: [], releasing: [], willWrite: {}, verify: {},
                               yieldingTo: true).busy.map(PatchSwitch.busy) ?? .switched
    }

    // MARK: Internals

    /// Runs `body` with every vCPU paused (or with none running), and returns the pause's length in ns.
    @discardableResult
    private func withPausedVCPUs(_ body: () throws(DMPRefusal) -> Void) throws(DMPRefusal) -> UInt64 {
        let start = ContinuousClock.now
        let paused = vm.pauseAll()
        guard paused || !vm.isRunning else { throw DMPRefusal(.patch, "the VM stopped while pausing") }
        defer { if paused { vm.resumeAll() } }
        try body()
        return nanoseconds(since: start)
    }

    /// The first vCPU whose RIP lies strictly inside bytes to be written (it would resume in the middle of the new
    /// instruction), or at the first byte of a write that guards its start; nil when none does. Compared by virtual
    /// address, which is conservative across address spaces. Throws when a vCPU's registers cannot be read.
    private func vcpuInside(_ writes: [CodeWrite]) throws(DMPRefusal) -> VCPUInside? {
        guard !writes.isEmpty else { return nil }
        for v in vm.vcpus {
            let r: Registers
            do { r = try v.registers() } catch {
                throw DMPRefusal(.patch, "cannot read vCPU \(v.id)'s registers to check that it is not inside the bytes to write: \(error)")
            }
            for w in writes where (r.rip > w.virtual || (w.guardsItsStart && r.rip == w.virtual)) && r.rip < w.virtual &+ UInt64(w.original.count) {
                return VCPUInside(vcpu: v.id, rip: r.rip, instruction: w.virtual)
            }
        }
        return nil
    }

    /// Lifts the guards of `freed` (pages no patch relies on any more) and of the pages stranded before, in one
    /// slot change; on failure they all stay stranded and the reason is returned.
    private func unguard(_ freed: [UInt64]) -> String? {
        let pages = stranded.withLock { s -> [UInt64] in
            s.formUnion(freed)
            return s.sorted()
        }
        guard !pages.isEmpty else { return nil }
        do { try vm.slots.unprotect(Patcher.ranges(pages)) } catch {
            return "cannot unguard \(pages.map(hex)) (no patch relies on them; tried again later): \(error)"
        }
        stranded.withLock { $0.subtract(pages) }
        return nil
    }

    /// One-page ranges.
    private static func ranges(_ pages: [UInt64]) -> [GuestRange] { pages.map { GuestRange(start: GuestAddress($0), size: 0x1000) } }

    /// Counts one more use of each page; returns the pages that were not guarded before.
    private func addGuards(_ pages: [UInt64]) -> [UInt64] {
        // A stranded page a patch relies on again is simply guarded again.
        stranded.withLock { $0.subtract(pages) }
        return guardCounts.withLock { counts in
            var fresh: [UInt64] = []
            for p in Set(pages) {
                if counts[p, default: 0] == 0 { fresh.append(p) }
                counts[p, default: 0] += 1
            }
            return fresh.sorted()
        }
    }

    /// Drops one use of each page; returns the pages no patch relies on any more.
    @discardableResult
    private func removeGuards(_ pages: [UInt64]) -> [UInt64] {
        guardCounts.withLock { counts in
            var freed: [UInt64] = []
            for p in Set(pages) {
                guard let n = counts[p] else { continue }
                if n <= 1 { counts[p] = nil; freed.append(p) } else { counts[p] = n - 1 }
            }
            return freed.sorted()
        }
    }
}

/// `0x…` for addresses in messages.
func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

/// Nanoseconds elapsed since `start`.
func nanoseconds(since start: ContinuousClock.Instant) -> UInt64 { nanoseconds(from: start, to: .now) }

import Synchronization
import VMMKit

/// Writes patches into a running guest and takes them out again, with every
/// vCPU paused (DESIGN.md, DMP step 4 "Writing" and step 6).
///
/// Each call: pause every vCPU (their pending accesses complete on their own
/// threads), refuse if any vCPU's RIP is strictly inside bytes to be written,
/// check the bytes are still the expected ones, write, guard or unguard pages,
/// serialize, resume (paused vCPUs serialize before they re-enter the guest).
package final class Patcher: @unchecked Sendable {
    private unowned let vm: VirtualMachine
    /// Guarded pages and how many patches rely on each.
    private let guardCounts = Mutex<[UInt64: Int]>([:])

    /// Creates a patcher for `vm`.
    package init(vm: VirtualMachine) { self.vm = vm }

    /// Tests only: called with every vCPU paused just before ``apply(_:guarding:implant:verify:)`` runs its
    /// checks, standing in for another vCPU or a device changing guest memory between the plan and the write;
    /// the closure it returns runs after the checks (and the write, if any), still paused. Set before the VM runs.
    package var beforeWriteChecks: (@Sendable () -> (@Sendable () -> Void))?

    /// The pages DMP guards now.
    package var guardedPages: [UInt64] { guardCounts.withLock { $0.keys.sorted() } }

    /// Applies `writes` (all or none; each finds ``CodeWrite/expected`` there) and guards `pages` (page-aligned
    /// guest-physical addresses; each use counted). `implant` bytes (code and data the patch jumps to, in memory
    /// the guest does not execute yet) are written first. `releasing`: pages of a patch this one replaces (a
    /// rebuilt function copy), one use each dropped after the writes, in the same pause.
    /// `verify` runs first with every vCPU paused: the checks that must hold at the
    /// moment of writing (the guest's mappings, the code the plan was made from).
    /// - Returns: the nanoseconds the vCPUs were paused.
    @discardableResult
    package func apply(_ writes: [CodeWrite], guarding pages: [UInt64], implant: [(GuestAddress, [UInt8])] = [],
                       releasing: [UInt64] = [], verify: () throws(DMPRefusal) -> Void = {}) throws(DMPRefusal) -> UInt64 {
        try withPausedVCPUs { () throws(DMPRefusal) in
            let restore = beforeWriteChecks?()
            defer { restore?() }
            try verify()
            try checkRIPs(outside: writes)
            for w in writes {
                guard w.original.count == w.replacement.count else {
                    throw DMPRefusal(.patch, "internal: a write of \(w.replacement.count) bytes over \(w.original.count)")
                }
                let now = try? vm.memory.readBytes(at: w.physical, count: w.original.count)
                guard now == w.expected else {
                    throw DMPRefusal(.patch, "the code at \(hex(w.virtual)) changed since it was planned")
                }
            }
            for (a, b) in implant {
                do { try vm.memory.writeAsGuardOwner(b, at: a) } catch {
                    throw DMPRefusal(.implant, "cannot write the implant at \(a): \(error)")
                }
            }
            let newPages = addGuards(pages)
            do { try vm.slots.protect(newPages.map { GuestRange(start: GuestAddress($0), size: 0x1000) }) } catch {
                removeGuards(pages)
                throw DMPRefusal(.guard, "cannot guard \(newPages.map(hex)): \(error)")
            }
            var done: [CodeWrite] = []
            for w in writes {
                do { try vm.memory.writeAsGuardOwner(w.replacement, at: w.physical) } catch {
                    for d in done.reversed() { try? vm.memory.writeAsGuardOwner(d.expected, at: d.physical) }
                    let freed = removeGuards(pages)
                    try? vm.slots.unprotect(freed.map { GuestRange(start: GuestAddress($0), size: 0x1000) })
                    throw DMPRefusal(.patch, "cannot write \(hex(w.virtual)): \(error)")
                }
                done.append(w)
            }
            let freed = removeGuards(releasing)
            try? vm.slots.unprotect(freed.map { GuestRange(start: GuestAddress($0), size: 0x1000) })
            VirtualMachine.serializeCallingThread()
        }
    }

    /// Restores the original bytes of `writes` where the patch's bytes are still
    /// there (a guest may have overwritten them since: its bytes stand) and drops
    /// one use of each of `pages`, unguarding pages no patch relies on any more. `evicting`: writes into
    /// implanted code applied in the same pause where their ``CodeWrite/expected`` bytes are still there (a
    /// function copy's pads turned into jumps back to the original).
    /// - Returns: how many writes were restored.
    @discardableResult
    package func revert(_ writes: [CodeWrite], unguarding pages: [UInt64], evicting: [CodeWrite] = []) throws(DMPRefusal) -> Int {
        var restored = 0
        try withPausedVCPUs { () throws(DMPRefusal) in
            try checkRIPs(outside: writes + evicting)
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
            let freed = removeGuards(pages)
            do { try vm.slots.unprotect(freed.map { GuestRange(start: GuestAddress($0), size: 0x1000) }) } catch {
                throw DMPRefusal(.guard, "cannot unguard \(freed.map(hex)): \(error)")
            }
            VirtualMachine.serializeCallingThread()
        }
        return restored
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

    /// Refuses when a vCPU's RIP lies strictly inside bytes to be written (it would
    /// resume in the middle of the new instruction). Compared by virtual address,
    /// which is conservative across address spaces.
    private func checkRIPs(outside writes: [CodeWrite]) throws(DMPRefusal) {
        for v in vm.vcpus {
            guard let r = try? v.registers() else { continue }
            for w in writes where (r.rip > w.virtual || (w.guardsItsStart && r.rip == w.virtual)) && r.rip < w.virtual &+ UInt64(w.original.count) {
                throw DMPRefusal(.patch, "vCPU \(v.id) is inside the instruction at \(hex(w.virtual))")
            }
        }
    }

    /// Counts one more use of each page; returns the pages that were not guarded before.
    private func addGuards(_ pages: [UInt64]) -> [UInt64] {
        guardCounts.withLock { counts in
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

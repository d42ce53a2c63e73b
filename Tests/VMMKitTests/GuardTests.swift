import Testing
import VMMKit
import VMMKitTesting
#if canImport(Glibc)
import Glibc
#endif

/// What a guard listener heard.
final class GuardLog: PageGuardListener, @unchecked Sendable {
    private let lock = NSLockish()
    private var _writes: [GuardedWrite] = []
    private var _failures: [GuardedEmulationFailure] = []
    let decision: GuardDecision
    let onWrite: (@Sendable (GuardedWrite, ExitContext?) -> Void)?
    init(decision: GuardDecision = .fail, onWrite: (@Sendable (GuardedWrite, ExitContext?) -> Void)? = nil) {
        self.decision = decision
        self.onWrite = onWrite
    }
    var writes: [GuardedWrite] { lock.with { _writes } }
    var failures: [GuardedEmulationFailure] { lock.with { _failures } }
    func guardedWrite(_ write: GuardedWrite, context: ExitContext?) {
        lock.with { _writes.append(write) }
        onWrite?(write, context)
    }
    func guardedEmulationFailure(_ failure: GuardedEmulationFailure, context: ExitContext) -> GuardDecision {
        lock.with { _failures.append(failure) }
        return decision
    }
}

/// A tiny lock for test bookkeeping shared with vCPU threads.
final class NSLockish: @unchecked Sendable {
    private var m = pthread_mutex_t()
    init() { pthread_mutex_init(&m, nil) }
    func with<R>(_ body: () throws -> R) rethrows -> R {
        pthread_mutex_lock(&m)
        defer { pthread_mutex_unlock(&m) }
        return try body()
    }
}

private let page: UInt64 = 4096

private func range(_ start: UInt64, _ size: UInt64) -> GuestRange { GuestRange(start: GuestAddress(start), size: size) }

/// A mock VM with RAM carved at `granularity`.
private func guardVM(_ mock: MockHypervisor, memory: UInt64 = 4 << 20, granularity: UInt64 = 2 << 20,
                     vcpus: Int = 1, configure: (inout VMConfiguration) -> Void = { _ in }) throws -> VirtualMachine {
    var c = VMConfiguration(memorySize: memory, vcpuCount: vcpus)
    c.slotGranularity = granularity
    configure(&c)
    return try VirtualMachine(backend: mock, configuration: c)
}

/// The layout as (start, size, read-only) triples.
private func layout(_ vm: VirtualMachine) -> [String] {
    vm.slots.slots.map { "\(String($0.range.start.rawValue, radix: 16))+\(String($0.range.size, radix: 16))\($0.readOnly ? " ro" : "")" }
}

/// The slots the mock backend holds, as the same triples, sorted.
private func backendLayout(_ mock: MockHypervisor) -> [String] {
    (mock.vms.last?.slots.values.sorted { $0.range.start < $1.range.start } ?? []).map {
        "\(String($0.range.start.rawValue, radix: 16))+\(String($0.range.size, radix: 16))\($0.flags.contains(.readOnly) ? " ro" : "")"
    }
}

@Suite("Memory slots and page guards")
struct GuardTests {
    @Test("RAM is carved at the granularity, the zap-all quirk is disabled, slot numbers are distinct")
    func carving() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock, memory: 8 << 20, granularity: 2 << 20)
        #expect(layout(vm) == ["0+200000", "200000+200000", "400000+200000", "600000+200000"])
        #expect(backendLayout(mock) == layout(vm))
        #expect(Set(vm.slots.slots.map(\.number)).count == 4)
        #expect(vm.slots.zapAllQuirkDisabled)
        let caps = try #require(mock.vms.last).enabledCapabilities
        #expect(caps.contains { $0.capability == KVMCapability.disableQuirks2 && $0.args == [KVMCapability.x86QuirkSlotZapAll] })
    }

    @Test("granularity 0 keeps one slot per region and leaves the quirk alone; a read-only region keeps its slot")
    func oneBigSlot() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock, granularity: 0) { c in c.extraRegions = [(range(0x1000_0000, 0x2000), true)] }
        #expect(layout(vm) == ["0+400000", "10000000+2000 ro"])
        #expect(!vm.slots.zapAllQuirkDisabled)
        #expect(try #require(mock.vms.last).enabledCapabilities.isEmpty)
    }

    @Test("granularity is coarsened so the carving stays within the slot budget")
    func coarsened() throws {
        let mock = MockHypervisor()
        mock.capabilities[Int32(KVMCapability.nrMemslots)] = 64
        let vm = try guardVM(mock, memory: 64 << 20, granularity: 4096)
        #expect(vm.slots.granularity == 2 << 20, "64 MiB in at most 32 slots")
        #expect(vm.slots.slots.count == 32)
    }

    @Test("protecting the first page of a region splits it exactly; unprotecting merges it back")
    func firstPage() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        let before = layout(vm)
        try vm.slots.protect(range(0, page))
        #expect(layout(vm) == ["0+1000 ro", "1000+1ff000", "200000+200000"])
        #expect(backendLayout(mock) == layout(vm))
        #expect(vm.memory.protectedRanges == [range(0, page)])
        #expect(vm.memory.isProtected(GuestAddress(0xfff)) && !vm.memory.isProtected(GuestAddress(0x1000)))
        let deleted = try #require(mock.vms.last).deletedSlots
        #expect(deleted.map(\.range) == [range(0, 2 << 20)], "only the slot holding the page was deleted")
        try vm.slots.unprotect(range(0, page))
        #expect(layout(vm) == before)
        #expect(backendLayout(mock) == before)
        #expect(vm.memory.protectedRanges.isEmpty)
    }

    @Test("protecting the last page of RAM splits exactly at the region's end")
    func lastPage() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        try vm.slots.protect(range((4 << 20) - page, page))
        #expect(layout(vm) == ["0+200000", "200000+1ff000", "3ff000+1000 ro"])
        try vm.slots.unprotect(range((4 << 20) - page, page))
        #expect(layout(vm) == ["0+200000", "200000+200000"])
    }

    @Test("a range is rounded out to pages; adjacent pages of one request become one slot in one batch")
    func batched() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        let calls = mock.log.calls(.setUserMemoryRegion).count
        // Two adjacent pages and a byte range inside a page of the other granule.
        try vm.slots.protect([range(0x10000, page), range(0x11000, page), range(0x300010, 8)])
        #expect(layout(vm) == ["0+10000", "10000+2000 ro", "12000+1ee000", "200000+100000", "300000+1000 ro", "301000+ff000"])
        #expect(mock.log.calls(.setUserMemoryRegion).count - calls == 2 + 6, "two deletes, six creates")
        // Unprotecting one page of the run keeps the other guarded.
        try vm.slots.unprotect(range(0x10000, 1))
        #expect(vm.memory.protectedRanges == [range(0x11000, page), range(0x300000, page)])
    }

    @Test("protecting guarded pages again, or unprotecting unguarded ones, touches no slot")
    func idempotent() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        try vm.slots.protect(range(0x5000, page))
        let calls = mock.log.calls(.setUserMemoryRegion).count
        try vm.slots.protect(range(0x5000, page))
        try vm.slots.protect(range(0x5800, 16))
        try vm.slots.unprotect(range(0x9000, page))
        #expect(mock.log.calls(.setUserMemoryRegion).count == calls)
    }

    @Test("a range crossing granules is guarded in both; unprotect restores both granules")
    func acrossGranules() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        try vm.slots.protect(range((2 << 20) - page, 2 * page))
        #expect(layout(vm) == ["0+1ff000", "1ff000+1000 ro", "200000+1000 ro", "201000+1ff000"])
        #expect(vm.memory.protectedRanges == [range((2 << 20) - page, 2 * page)])
        try vm.slots.unprotect(range(0, 4 << 20))
        #expect(layout(vm) == ["0+200000", "200000+200000"])
    }

    @Test("hostile ranges get typed errors and change nothing", arguments: [
        (range(0x1000, 0), "empty"), (range(UInt64.max - 0x800, 0x1000), "overflow"), (range(UInt64.max - 0x10, 0x8), "overflow"),
        (range(4 << 20, page), "notRAM"), (range((4 << 20) - page, 2 * page), "notRAM"), (range(0x1000_0000, page), "notRAM"),
        // At the top of the address space: ending exactly at 2^64 or rounding up to it overflows; the last page
        // that rounds without overflow is just not RAM.
        (range(UInt64.max - 0xfff, 0x1000), "overflow"), (range(UInt64.max - 0x1ffe, 0x1000), "overflow"),
        (range(UInt64.max - 0x1fff, 0x1000), "notRAM"), (range(UInt64.max, 1), "overflow"),
        (range(0, UInt64.max), "overflow"), (range(0, UInt64.max - 0xfff), "notRAM"),
    ])
    func hostile(r: GuestRange, kind: String) throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock) { c in c.extraRegions = [(range(0x1000_0000, 0x2000), true)] }
        let before = layout(vm)
        for op in [vm.slots.protect(_:) as (GuestRange) throws(MemorySlotError) -> Void, vm.slots.unprotect(_:), vm.slots.isolate(_:)] {
            do {
                try op(r)
                Issue.record("accepted \(r)")
            } catch {
                switch (error, kind) {
                case (.emptyRange, "empty"), (.overflow, "overflow"), (.notRAM, "notRAM"): break
                default: Issue.record("\(r): \(error)")
                }
            }
        }
        #expect(layout(vm) == before)
    }

    @Test("a change needing more slots than the hypervisor has is refused before any slot is touched")
    func outOfSlots() throws {
        let mock = MockHypervisor()
        mock.capabilities[Int32(KVMCapability.nrMemslots)] = 40
        let vm = try guardVM(mock)
        let calls = mock.log.calls(.setUserMemoryRegion).count
        let every2nd = (0..<30).map { range(UInt64($0) * 2 * page, page) }
        #expect(throws: MemorySlotError.outOfSlots(needed: 61, limit: 40)) { try vm.slots.protect(every2nd) }
        #expect(mock.log.calls(.setUserMemoryRegion).count == calls)
        #expect(vm.memory.protectedRanges.isEmpty)
    }

    @Test("a failing slot ioctl is rolled back: the layout and the guard view stay as they were")
    func rollBack() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        let before = layout(vm)
        mock.log.inject(.outOfMemory, into: .setUserMemoryRegion)
        do {
            try vm.slots.protect(range(0x3000, page))
            Issue.record("no error")
        } catch {
            guard case .backend(let e, let rolledBack) = error else { Issue.record("\(error)"); return }
            #expect(e.errno == .outOfMemory && rolledBack)
        }
        #expect(layout(vm) == before && backendLayout(mock) == before)
        #expect(vm.memory.protectedRanges.isEmpty)
        #expect(mock.finish().isEmpty)
    }

    @Test("a change whose rollback fails too: the manager records what the hypervisor holds, and the next change repairs the layout",
          arguments: 0..<6)
    func failedRollBackIsRepaired(skip: Int) throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        let before = layout(vm)
        // Two failures in a row from the `skip`-th call on: the change fails and so does the rollback's first call.
        mock.log.inject(.ioError, into: .setUserMemoryRegion, count: 2, skipping: skip)
        let failed: Bool
        do { try vm.slots.protect(range(0x3000, page)); failed = false } catch { failed = true }
        if failed {
            #expect(layout(vm) == backendLayout(mock), "the manager's view is the hypervisor's")
            // An injected failure the protect did not reach fails the next change, rolled back.
            for _ in 0..<2 where !mock.log.undeliveredFailures.isEmpty { _ = try? vm.slots.unprotect(range(0x3000, page)) }
            #expect(layout(vm) == backendLayout(mock))
            // Lifting the guard (a no-op for the guards) registers the whole layout again: no hole in RAM stays.
            try vm.slots.unprotect(range(0x3000, page))
            #expect(layout(vm) == backendLayout(mock))
            let covered = vm.slots.slots.reduce(UInt64(0)) { $0 + $1.range.size }
            #expect(covered == 4 << 20, "RAM has a hole: \(layout(vm))")
            #expect(vm.memory.protectedRanges.isEmpty)
        }
        for _ in 0..<2 where !mock.log.undeliveredFailures.isEmpty { _ = try? vm.slots.unprotect(range(0x3000, page)) }
        try vm.slots.unprotect(range(0x3000, page))
        #expect(backendLayout(mock).count == before.count && layout(vm) == backendLayout(mock))
    }

    @Test("a change that failed and was rolled back hands its slot numbers out again")
    func rollBackKeepsNumbersDense() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        let backend = try #require(mock.vms.last)
        // A slot number the manager will hand out next, taken behind its back: creating there fails.
        let foreign = try GuestMemory(size: page)
        try backend.setUserMemoryRegion(MemorySlot(slot: 2, range: range(0x4000_0000, page), host: foreign.regions[0].host))
        #expect(throws: MemorySlotError.self) { try vm.slots.protect(range(0x3000, page)) }
        #expect(layout(vm) == ["0+200000", "200000+200000"])
        try backend.setUserMemoryRegion(MemorySlot(slot: 2, range: range(0x4000_0000, 0), host: nil))
        try vm.slots.protect(range(0x3000, page))
        let numbers = vm.slots.slots.map(\.number).sorted()
        #expect(numbers == Array(0..<UInt32(numbers.count)), "no number was lost to the failed change: \(numbers)")
    }

    @Test("the mock refuses overlapping slots (EEXIST), in-place changes and deletes of absent slots (EINVAL), and records deletes")
    func mockSlotRules() throws {
        let mock = MockHypervisor()
        let backend = try mock.createVM()
        let memory = try GuestMemory(size: 64 * page)
        let host = memory.regions[0].host
        try backend.setUserMemoryRegion(MemorySlot(slot: 0, range: range(0, 2 * page), host: host))
        #expect { try backend.setUserMemoryRegion(MemorySlot(slot: 1, range: range(page, 2 * page), host: host)) } throws: { e in
            (e as? BackendError)?.errno == .exists
        }
        #expect { try backend.setUserMemoryRegion(MemorySlot(slot: 0, flags: .readOnly, range: range(0, 2 * page), host: host)) } throws: { e in
            (e as? BackendError)?.errno == .invalidArgument
        }
        #expect { try backend.setUserMemoryRegion(MemorySlot(slot: 5, range: range(0x10000, 0), host: nil)) } throws: { e in
            (e as? BackendError)?.errno == .invalidArgument
        }
        try backend.setUserMemoryRegion(MemorySlot(slot: 0, range: range(0, 0), host: nil))
        try backend.setUserMemoryRegion(MemorySlot(slot: 1, range: range(page, 2 * page), host: host + 4096))
        let vm = try #require(mock.vms.last)
        #expect(vm.deletedSlots.map(\.slot) == [0])
        #expect(vm.slots.keys.sorted() == [1])
    }

    @Test("dirty logs of deleted slots are harvested before the delete and not lost")
    func dirtyHarvest() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock) { c in c.logDirtyPages = true }
        let mvm = try #require(mock.vms.last)
        #expect(mvm.slots.values.allSatisfy { $0.flags.contains(.logDirtyPages) })
        mvm.markDirty(GuestAddress(0x7000))
        mvm.markDirty(GuestAddress(0x250000))
        try vm.slots.protect(range(0x8000, page))
        let ops = mock.log.calls.filter { $0.operation == .getDirtyLog || $0.operation == .setUserMemoryRegion }.suffix(5)
        #expect(ops.first?.operation == .getDirtyLog, "\(ops)")
        #expect(try vm.slots.dirtyPages() == [GuestAddress(0x7000), GuestAddress(0x250000)])
        #expect(try vm.slots.dirtyPages().isEmpty, "reading clears")
    }

    @Test("guest stores into guarded pages, applied by the guard handler, count as dirty pages")
    func dirtyGuardedStores() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock) { c in c.logDirtyPages = true }
        try vm.slots.protect([range(0x8000, page), range(0x1ff000, 2 * page)])
        #expect(try vm.slots.dirtyPages().isEmpty)
        mock.vcpu(0)?.script([.guestStore(GuestAddress(0x8010), size: 4, value: 1),
                              .guestStore(GuestAddress(0x1ffffc), size: 8, value: 2), // across two guarded pages
                              .guestStore(GuestAddress(0x9000), size: 1, value: 3)])  // unguarded: KVM's log
        #expect(try vm.run() == .halted)
        #expect(try vm.slots.dirtyPages() == [GuestAddress(0x8000), GuestAddress(0x9000), GuestAddress(0x1ff000), GuestAddress(0x200000)])
        #expect(try vm.slots.dirtyPages().isEmpty, "reading clears")
    }

    @Test("the loader gives a flat image's code slots of its own")
    func loaderIsolates() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock, memory: 32 << 20)
        _ = try X86Boot.load(.flat([0x90, 0xf4]), into: vm)
        let s = try #require(vm.slots.slot(containing: GuestAddress(0x100000)))
        #expect(s.range == range(0x100000, page))
        #expect(vm.slots.slot(containing: GuestAddress(0xfffff))?.range.end == 0x100000)
    }

    @Test("region lookup finds every region by binary search, and nothing in the holes")
    func regionLookup() throws {
        var regions: [(GuestRange, Bool)] = []
        for i in 0..<UInt64(9) {
            let r = range(i * 0x10000 + 0x4000, page * (i + 1))
            regions.append((r, i % 3 == 0))
        }
        let m = try GuestMemory(ranges: regions.reversed())
        for (r, ro) in regions {
            #expect(m.region(containing: r.start)?.range == r)
            #expect(m.region(containing: GuestAddress(r.start.rawValue + r.size - 1))?.readOnly == ro)
            #expect(m.region(containing: GuestAddress(r.start.rawValue + r.size)) == nil)
            #expect(m.region(containing: GuestAddress(r.start.rawValue - 1)) == nil)
        }
        #expect(m.region(containing: GuestAddress(.max)) == nil)
    }
}

/// Guest and host writes into guarded pages (mock).
extension GuardTests {
    /// The width/alignment grid: every width 1...8 at every offset 0...7 around a
    /// page start, and stores that end at or cross the page's end.
    static let stores: [(offset: UInt64, size: Int)] = {
        var s: [(UInt64, Int)] = []
        for size in 1...8 {
            for off in 0..<UInt64(8) { s.append((off, size)) }
            for back in 1...8 { s.append((page - UInt64(back), size)) }
        }
        return s
    }()

    @Test("a guest store of every width and alignment into a guarded page lands and is reported; a store crossing into an unguarded page lands whole")
    func guestStores() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        let log = GuardLog()
        vm.setPageGuardListener(log)
        let base: UInt64 = 0x20000
        try vm.slots.protect(range(base, page))
        var expected = [UInt8](repeating: 0, count: Int(2 * page))
        var steps: [MockStep] = []
        var inGuard: [GuestRange] = []
        for (i, st) in GuardTests.stores.enumerated() {
            let value = 0x8877_6655_4433_2211 &* UInt64(i + 1)
            steps.append(.guestStore(GuestAddress(base + st.offset), size: st.size, value: value))
            for b in 0..<st.size { expected[Int(st.offset) + b] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(b))) }
            let inPage = min(UInt64(st.size), page - st.offset)
            inGuard.append(range(base + st.offset, inPage))
        }
        mock.vcpu(0)?.script(steps)
        #expect(try vm.run() == .halted)
        #expect(try vm.memory.readBytes(at: GuestAddress(base), count: Int(2 * page)) == expected)
        #expect(log.writes.map(\.range) == inGuard, "each store's bytes in the guarded page were reported, once")
        #expect(log.writes.allSatisfy { $0.source == .guest(vcpu: 0) })
        #expect(vm.statistics()[.mmio] == inGuard.count)
        #expect(mock.finish().isEmpty)
    }

    @Test("the guard handler runs first: user handlers never see a guarded store, and see other MMIO exits")
    func handlerIsFirst() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        final class Seen: @unchecked Sendable { var mmio: [MMIOAccess] = [] }
        let seen = Seen()
        vm.addExitHandler(ClosureExitHandler { exit, _ in
            if case .mmio(let m) = exit { seen.mmio.append(m); return .handled }
            return .pass
        })
        try vm.slots.protect(range(0x7000, page))
        mock.vcpu(0)?.script([.guestStore(GuestAddress(0x7004), size: 4, value: 9), .guestStore(GuestAddress(0xd000_0000), size: 1, value: 1)])
        #expect(try vm.run() == .halted)
        #expect(try vm.memory.read(UInt32.self, at: GuestAddress(0x7004)) == 9)
        #expect(seen.mmio.map(\.address) == [GuestAddress(0xd000_0000)])
    }

    @Test("a store crossing from a guarded page into another guarded page exits twice and both parts land")
    func crossingGuardedPages() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        let log = GuardLog()
        vm.setPageGuardListener(log)
        let base: UInt64 = 0x1ff000 // the two pages sit in different carved slots
        try vm.slots.protect(range(base, 2 * page))
        mock.vcpu(0)?.script([.guestStore(GuestAddress(base + page - 3), size: 8, value: 0x0807_0605_0403_0201)])
        #expect(try vm.run() == .halted)
        #expect(try vm.memory.readBytes(at: GuestAddress(base + page - 3), count: 8) == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(log.writes.map(\.range) == [range(base + page - 3, 3), range(base + page, 5)])
    }

    @Test("a store from an unguarded page into a guarded one: KVM writes the first part, the guarded part exits")
    func crossingIntoGuard() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        let log = GuardLog()
        vm.setPageGuardListener(log)
        try vm.slots.protect(range(0x31000, page))
        mock.vcpu(0)?.script([.guestStore(GuestAddress(0x30ffe), size: 4, value: 0xddcc_bbaa)])
        #expect(try vm.run() == .halted)
        #expect(try vm.memory.read(UInt32.self, at: GuestAddress(0x30ffe)) == 0xddcc_bbaa)
        #expect(log.writes.map(\.range) == [range(0x31000, 2)])
    }

    @Test("a store into unguarded RAM does not exit; a store into unbacked memory exits to the bus")
    func unguardedStores() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        let dev = RecordingDevice()
        try vm.bus.attach(dev, mmio: range(0xd000_0000, page))
        mock.vcpu(0)?.script([.guestStore(GuestAddress(0x4000), size: 2, value: 0xbeef), .guestStore(GuestAddress(0xd000_0010), size: 4, value: 7)])
        #expect(try vm.run() == .halted)
        #expect(try vm.memory.read(UInt16.self, at: GuestAddress(0x4000)) == 0xbeef)
        #expect(vm.statistics()[.mmio] == 1)
        #expect(dev.writes.count == 1 && dev.writes[0].offset == 0x10 && dev.writes[0].value == 7)
    }

    @Test("host-side writes into a guarded page are applied and reported; DMA into a read-only region is still refused")
    func hostWrites() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock) { c in c.extraRegions = [(range(0x1000_0000, page), true)] }
        let log = GuardLog()
        vm.setPageGuardListener(log)
        try vm.slots.protect(range(0x6000, page))
        try vm.memory.write(UInt32(0x1234_5678), at: GuestAddress(0x6ffe))
        try vm.memory.dmaWrite(UInt16(0xabcd), at: GuestAddress(0x6010))
        try vm.memory.fill(0xee, at: GuestAddress(0x5ff0), count: 0x20)
        try vm.memory.write(UInt32(1), at: GuestAddress(0x8000)) // unguarded: not reported
        #expect(try vm.memory.read(UInt32.self, at: GuestAddress(0x6ffe)) == 0x1234_5678)
        #expect(try vm.memory.read(UInt16.self, at: GuestAddress(0x6010)) == 0xabcd)
        #expect(log.writes == [GuardedWrite(range: range(0x6ffe, 4), source: .host), GuardedWrite(range: range(0x6010, 2), source: .host),
                               GuardedWrite(range: range(0x5ff0, 0x20), source: .host)])
        #expect(throws: GuestMemoryError.readOnly(GuestAddress(0x1000_0000))) { try vm.memory.dmaWrite(UInt8(1), at: GuestAddress(0x1000_0000)) }
    }

    @Test("protect while running, from a handler on the vCPU's own thread, with a second vCPU spinning; the listener unprotects on the first write")
    func protectWhileRunning() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock, vcpus: 2)
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        let target = range(0x40000, page)
        let log = GuardLog { write, ctx in
            // DMP would unpatch here; unprotecting from the vCPU's handler is legal.
            if let ctx { try? ctx.vm.slots.unprotect(write.range) }
        }
        vm.setPageGuardListener(log)
        vm.addExitHandler(ClosureExitHandler { exit, ctx in
            guard case .io(let io) = exit, io.port == 0x80 else { return .pass }
            do { try ctx.vm.slots.protect(target) } catch { Issue.record("\(error)") }
            return .handled
        })
        mock.vcpu(0)?.script([out(0x80, 1), .guestStore(GuestAddress(0x40008), size: 8, value: 42),
                              .guestStore(GuestAddress(0x40010), size: 8, value: 43), debugExit3])
        mock.vcpu(1)?.script([.spin])
        #expect(try vm.run() == .guestExit(status: 3))
        #expect(log.writes.map(\.range) == [range(0x40008, 8)], "the second store ran unguarded")
        #expect(try vm.memory.read(UInt64.self, at: GuestAddress(0x40008)) == 42)
        #expect(try vm.memory.read(UInt64.self, at: GuestAddress(0x40010)) == 43)
        #expect(vm.memory.protectedRanges.isEmpty)
        #expect(layout(vm) == ["0+200000", "200000+200000"])
    }

    /// An emulation failure as KVM reports it: flags, then insn_size and the bytes (`movq %xmm0,(%rdi)`).
    static let movqFailure = InternalError(suberror: 1, data: [1, 0x07_d6_0f_66_04, 0])

    @Test("an emulation failure while pages are guarded goes to the listener, which may retry")
    func emulationFailureRetried() throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        let log = GuardLog(decision: .retry)
        vm.setPageGuardListener(log)
        try vm.slots.protect(range(0x9000, page))
        let caps = try #require(mock.vms.last).enabledCapabilities
        #expect(caps.contains { $0.capability == KVMCapability.exitOnEmulationFailure && $0.args == [1] })
        mock.vcpu(0)?.script([.exit(.internalError(GuardTests.movqFailure))])
        #expect(try vm.run() == .halted)
        #expect(log.failures.count == 1)
        #expect(log.failures.first?.instructionBytes == [0x66, 0x0f, 0xd6, 0x07])
    }

    /// A resolver that answers what the test says.
    final class FixedResolver: EmulationFailureResolver {
        let answer: [GuestRange]?
        init(_ answer: [GuestRange]?) { self.answer = answer }
        func writes(of failure: GuardedEmulationFailure, context: ExitContext) -> [GuestRange]? { answer }
    }

    @Test("with a resolver, only failures writing a guarded page (or unresolved) reach the listener, with the bytes", arguments: [
        ([range(0x9ffc, 4)], true), ([range(0x8ffc, 4), range(0x9000, 4)], true), (nil, true), ([range(0xa000, 8)], false), ([], false),
    ])
    func emulationFailureResolved(writes: [GuestRange]?, reported: Bool) throws {
        let mock = MockHypervisor()
        let vm = try guardVM(mock)
        let log = GuardLog(decision: .retry)
        vm.setPageGuardListener(log)
        vm.setEmulationFailureResolver(FixedResolver(writes))
        try vm.slots.protect(range(0x9000, page))
        mock.vcpu(0)?.script([.exit(.internalError(GuardTests.movqFailure))])
        if reported {
            #expect(try vm.run() == .halted)
            #expect(log.failures.count == 1 && log.failures.first?.writes == writes)
        } else {
            #expect(throws: VMError.self) { try vm.run() }
            #expect(log.failures.isEmpty)
        }
    }

    @Test("an emulation failure fails the VM without guards, when the listener says so, and after too many retries")
    func emulationFailureFails() throws {
        func run(protect: Bool, decision: GuardDecision, failures: Int) throws -> (Bool, GuardLog) {
            let mock = MockHypervisor()
            let vm = try guardVM(mock)
            let log = GuardLog(decision: decision)
            vm.setPageGuardListener(log)
            if protect { try vm.slots.protect(range(0x9000, page)) }
            mock.vcpu(0)?.script(Array(repeating: .exit(.internalError(GuardTests.movqFailure)), count: failures))
            do { _ = try vm.run(); return (false, log) } catch {
                guard case .guestFault(let f) = error, f.kind == .emulationFailure else { return (false, log) }
                return (true, log)
            }
        }
        let (a, la) = try run(protect: false, decision: .retry, failures: 1)
        #expect(a && la.failures.isEmpty)
        let (b, lb) = try run(protect: true, decision: .fail, failures: 1)
        #expect(b && lb.failures.count == 1)
        let (c, lc) = try run(protect: true, decision: .retry, failures: GuardedEmulationFailure.retryLimit + 4)
        #expect(c && lc.failures.count == GuardedEmulationFailure.retryLimit)
    }
}

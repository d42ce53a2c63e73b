import Synchronization
import Testing
import VMMKit
import VMMKitTesting

/// The doorbell's STATUS register as a shared-slot read (``FastPathKind/sharedSlotRead(slot:)``):
/// the slot holds the completion count whenever the read's enable word is set.
@Suite("Shared slots")
struct SharedSlotTests {
    /// A doorbell over 1 MiB of memory with its queue at 0x8000 (`entries` entries), enabled.
    static func doorbell(entries: UInt64 = 8) throws -> (DoorbellDevice, GuestMemory) {
        let m = try GuestMemory(size: 1 << 20)
        let d = DoorbellDevice(memory: m)
        _ = d.write(offset: 0x08, size: 4, value: 0x8000)
        _ = d.write(offset: 0x10, size: 4, value: entries)
        _ = d.write(offset: 0x14, size: 4, value: 1)
        return (d, m)
    }

    static let status = FastPathRequest(offset: DoorbellDevice.statusOffset, size: 4, direction: .read)

    @Test("doorbell STATUS: granted only as a read with a slot (1, 2, 4 or 8 bytes: the device answers the count at every width); the slot holds the count before the word is set")
    func grant() throws {
        let (d, _) = try Self.doorbell()
        for _ in 0..<3 { _ = d.write(offset: 0x40, size: 4, value: 9) }
        let words = FastPathEnableWordStorage(count: 1), slots = FastPathSlotStorage(count: 4)
        #expect(d.grantFastPath(Self.status, enableWord: words[0]) == nil, "no slot offered")
        var three = Self.status; three.size = 3; three.slot = slots[2]
        #expect(d.grantFastPath(three, enableWord: words[0]) == nil)
        var write = Self.status; write.direction = .write; write.slot = slots[2]
        #expect(d.grantFastPath(write, enableWord: words[0]) == nil)
        var id = Self.status; id.offset = 0; id.slot = slots[2]
        #expect(d.grantFastPath(id, enableWord: words[0]) == nil, "only STATUS")
        #expect(!words[0].isSet)
        var r = Self.status; r.slot = slots[2]
        let g = try #require(d.grantFastPath(r, enableWord: words[0]))
        #expect(g.kind == .sharedSlotRead(slot: 2) && g.offset == 4 && g.size == 4 && g.direction == .read)
        #expect(!g.independentOfPendingRingEntries, "entries posted but not applied (the static-PV twin) must make the read exit")
        #expect(words[0].isSet && slots.load(2) == 3)
        d.revokeFastPath(words[0])
        #expect(!words[0].isSet)
        _ = d.write(offset: 0x40, size: 4, value: 9)
        #expect(slots.load(2) == 3, "a revoked slot is never written again")
        #expect(d.read(offset: 4, size: 4) == 4)
    }

    @Test("doorbell STATUS at 1, 2 and 8 bytes: granted from the same slot, whose low bytes are what the device answers at that width", arguments: [1, 2, 8])
    func otherWidths(size: Int) throws {
        let (d, _) = try Self.doorbell(entries: 512)
        for _ in 0..<300 { _ = d.write(offset: 0x40, size: 4, value: 9) }
        let words = FastPathEnableWordStorage(count: 1), slots = FastPathSlotStorage(count: 1)
        var r = Self.status; r.size = size; r.slot = slots[0]
        let g = try #require(d.grantFastPath(r, enableWord: words[0]))
        #expect(g.kind == .sharedSlotRead(slot: 0) && g.size == size && words[0].isSet)
        let mask: UInt64 = size == 8 ? ~0 : (1 << UInt64(size * 8)) - 1
        #expect(slots.load(0) & mask == d.read(offset: 4, size: size) & mask)
        _ = d.write(offset: 0x40, size: 4, value: 9)
        #expect(slots.load(0) & mask == d.read(offset: 4, size: size) & mask && d.read(offset: 4, size: size) == 301)
        // The DOORBELL store is granted only at 4 bytes.
        let words2 = FastPathEnableWordStorage(count: 1)
        #expect(d.grantFastPath(FastPathRequest(offset: 0x40, size: size, direction: .write, ring: 1), enableWord: words2[0]) == nil)
    }

    @Test("doorbell STATUS: the slot equals STATUS after every register write (exit or ring batch), errors and reconfiguration included")
    func keptCurrent() throws {
        let (d, _) = try Self.doorbell(entries: 4)
        let words = FastPathEnableWordStorage(count: 2), slots = FastPathSlotStorage(count: 1)
        var r = Self.status; r.slot = slots[0]
        _ = try #require(d.grantFastPath(r, enableWord: words[0]))
        _ = try #require(d.grantFastPath(FastPathRequest(offset: 0x40, size: 4, direction: .write, ring: 1), enableWord: words[1]))
        var rng = SplitMix64(state: 0x510_7000)
        // Reconfiguration (valid and not), writes to read-only and unknown registers.
        let configuration: [(UInt64, UInt64)] = [
            (0x14, 1), (0x14, 1), (0x14, 0), (0x10, 4), (0x10, 4), (0x10, 3), (0x10, 8192), (0x10, 0),
            (0x08, 0x8000), (0x08, 0x8000), (0x08, 0xffff_fff8), (0x0c, 0), (0x0c, 0), (0x0c, 0xffff_ffff),
            (0x00, 7), (0x04, 0x1234), (0x18, 0), (0x44, 9), (0xffc, 1),
        ]
        var batches = 0
        for step in 0..<2000 {
            switch Int.random(in: 0..<10, using: &rng) {
            case 0..<5:
                _ = d.write(offset: 0x40, size: 4, value: UInt64.random(in: 0...0xffff_ffff, using: &rng))
            case 5..<7:
                let run = (0..<Int.random(in: 1...5, using: &rng)).map { _ in UInt64.random(in: 0...0xffff_ffff, using: &rng) }
                _ = run.withUnsafeBufferPointer { d.writeBatch(offset: 0x40, size: 4, values: $0) }
                batches += 1
            default:
                let (offset, value) = configuration[Int.random(in: 0..<configuration.count, using: &rng)]
                _ = d.write(offset: offset, size: 4, value: value)
            }
            let status = d.read(offset: 4, size: 4)
            #expect(slots.load(0) == status, "step \(step): slot \(slots.load(0)), STATUS \(status)")
            #expect(words[0].isSet, "step \(step): STATUS is always exact")
            let enabled = d.read(offset: 0x14, size: 4) == 1, n = d.read(offset: 0x10, size: 4)
            #expect(words[1].isSet == (enabled && n > 0 && n <= 4096 && n & (n - 1) == 0), "step \(step): the DOORBELL word follows its own preconditions")
        }
        #expect(batches > 100 && d.completions > 100 && d.error != 0, "the program wrote, batched and failed (\(d.completions) completions)")
    }

    @Test("doorbell STATUS: while a completion is written to RAM the read's word is clear and the slot still old; after it, the slot is current before the word is set")
    func orderingAgainstRAM() throws {
        let (d, m) = try Self.doorbell()
        let words = FastPathEnableWordStorage(count: 2), slots = FastPathSlotStorage(count: 1)
        var r = Self.status; r.slot = slots[0]
        _ = try #require(d.grantFastPath(r, enableWord: words[0]))
        _ = try #require(d.grantFastPath(FastPathRequest(offset: 0x40, size: 4, direction: .write, ring: 1), enableWord: words[1]))
        // Every host write into the queue's page is observed (as a page guard would), under the device's lock.
        let seen = Mutex<[(statusWord: Bool, slot: UInt64, doorbellWord: Bool)]>([])
        m.setProtected([GuestRange(start: GuestAddress(0x8000), size: 0x1000)])
        m.setHostWriteObserver { _ in seen.withLock { $0.append((words[0].isSet, slots.load(0), words[1].isSet)) } }
        defer { m.setHostWriteObserver(nil); m.setProtected([]) }
        _ = d.write(offset: 0x40, size: 4, value: 1)
        _ = d.write(offset: 0x40, size: 4, value: 2)
        let s = seen.withLock { $0 }
        #expect(s.count == 4, "two words per completion")
        #expect(s.allSatisfy { !$0.statusWord }, "a guest that saw the completion in RAM finds the STATUS word clear (it exits)")
        #expect(s.map(\.slot) == [0, 0, 1, 1], "the slot moves only after the completion's words")
        #expect(s.allSatisfy { $0.doorbellWord }, "the DOORBELL append stays served meanwhile")
        #expect(words[0].isSet && slots.load(0) == 2)
    }

    @Test("hostile: garbage in the slot changes nothing the VMM believes; the next change overwrites it")
    func hostileSlot() throws {
        let (d, m) = try Self.doorbell()
        let words = FastPathEnableWordStorage(count: 1)
        // The slot in guest memory, as DMP places it: the guest (or anyone) may write it.
        let slotAddress = GuestAddress(0x2008)
        let slot = try FastPathSlot(memory: m, at: slotAddress, index: 0)
        #expect(throws: GuestMemoryError.self) { try FastPathSlot(memory: m, at: GuestAddress(0x2004), index: 0) }
        #expect(throws: GuestMemoryError.self) { try FastPathSlot(memory: m, at: GuestAddress(1 << 20), index: 0) }
        var r = Self.status; r.slot = slot
        #expect(d.grantFastPath(r, enableWord: words[0])?.kind == .sharedSlotRead(slot: 0))
        for garbage: UInt64 in [.max, 0x8000_0000_0000_0000, 12345, 0] {
            try m.write(garbage, at: slotAddress)
            #expect(d.read(offset: 4, size: 4) == UInt64(d.completions), "STATUS by exit is the device's count")
            let before = d.completions
            _ = d.write(offset: 0x40, size: 4, value: garbage)
            #expect(d.completions == before &+ 1 && d.error == 0)
            #expect(try m.read(UInt64.self, at: slotAddress) == UInt64(d.completions), "rewritten at the next completion")
            #expect(try m.read(UInt32.self, at: GuestAddress(0x8000 + UInt64((before & 7) * 8) + 4)) == before &+ 1,
                    "completions keep their sequence")
        }
        #expect(words[0].isSet)
    }

    @Test("the bus passes a slot for reads only and refuses a shared-slot answer that names another slot")
    func bus() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        try vm.bus.attach(DoorbellDevice(memory: vm.memory), mmio: GuestRange(start: GuestAddress(0xd000_0000), size: 0x1000))
        let words = FastPathEnableWordStorage(count: 3), slots = FastPathSlotStorage(count: 3)
        let g = try vm.bus.grantFastPath(space: .mmio, address: 0xd000_0004, size: 4, direction: .read, slot: slots[1], enableWord: words[0])
        #expect(g.description.kind == .sharedSlotRead(slot: 1) && words[0].isSet)
        #expect(throws: FastPathRefusal.declined(device: "doorbell")) {
            try vm.bus.grantFastPath(space: .mmio, address: 0xd000_0004, size: 4, direction: .read, enableWord: words[1])
        }
        vm.bus.revokeFastPath(space: .mmio, address: 0xd000_0004, enableWord: words[0])
        #expect(!words[0].isSet)
        // A device that answers with a slot it was not offered.
        let rogue = FastPathTests.Rogue(FastPathDescription(kind: .sharedSlotRead(slot: 7), offset: 0, size: 4, direction: .read))
        try vm.bus.attach(rogue, ports: 0x600..<0x604)
        #expect(throws: FastPathRefusal.invalidDeclaration(device: "rogue")) {
            try vm.bus.grantFastPath(space: .pio, address: 0x600, size: 4, direction: .read, slot: slots[2], enableWord: words[2])
        }
        #expect(!words[2].isSet && rogue.revoked == [words[2]])
    }
}

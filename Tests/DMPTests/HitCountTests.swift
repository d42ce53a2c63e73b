@testable import DMP
import Testing
import VMMKit

/// ``HitCount``: a guest-written hit counter is believed only while its changes are plausible.
struct HitCountTests {
    let memory: GuestMemory
    let counter = GuestAddress(0x1008)

    init() throws {
        memory = try GuestMemory(ranges: [(GuestRange(start: GuestAddress(0), size: 1 << 20), false)])
    }

    @Test("increments the stub could have made are counted, across observations")
    func plausibleIncrements() throws {
        var h = HitCount(counter: counter, ring: nil, now: .now - .seconds(1))
        try memory.write(UInt64(1000), at: counter)
        #expect(h.observe(memory) { _ in nil } == 1000)
        try memory.write(UInt64(1500), at: counter)
        #expect(h.observe(memory) { _ in nil } == 1500)
        #expect(h.trusted)
    }

    @Test("a counter that went down is untrusted and keeps its last plausible total")
    func decrease() throws {
        var h = HitCount(counter: counter, ring: nil, now: .now - .seconds(1))
        try memory.write(UInt64(1000), at: counter)
        h.observe(memory) { _ in nil }
        try memory.write(UInt64(10), at: counter)
        #expect(h.observe(memory) { _ in nil } == 1000)
        #expect(!h.trusted)
        #expect(h.distrust?.contains("went down") == true)
        // Once untrusted, later values (even plausible ones) are not believed.
        try memory.write(UInt64(1200), at: counter)
        #expect(h.observe(memory) { _ in nil } == 1000)
    }

    @Test("a jump of more than one hit per nanosecond is untrusted")
    func jump() throws {
        var h = HitCount(counter: counter, ring: nil)
        try memory.write(UInt64(0x9e37_79b9_0000_0001), at: counter)
        #expect(h.observe(memory) { _ in nil } == 0)
        #expect(h.distrust?.contains("one per ns") == true)
    }

    @Test("a ring-append counter is bounded by the entries the ring consumed since the patch plus its slot count")
    func ringBound() throws {
        var h = HitCount(counter: counter, ring: (index: 0, slotCount: 4, consumed: 100), now: .now - .seconds(1))
        try memory.write(UInt64(50), at: counter)
        #expect(h.observe(memory) { _ in 148 } == 50)   // 48 consumed + 4 in flight: 50 is possible
        try memory.write(UInt64(60), at: counter)
        #expect(h.observe(memory) { _ in 150 } == 50)   // 60 > 50 + 4: not possible
        #expect(h.distrust?.contains("ring 0 consumed only 50") == true)
    }

    @Test("an unreadable counter leaves the count as it was")
    func unreadable() {
        var h = HitCount(counter: GuestAddress(1 << 40), ring: nil)
        #expect(h.observe(memory) { _ in nil } == 0)
        #expect(h.trusted)
    }
}

import Testing
import VMMKit
import VMMKitTesting

// Sizes a VMM author passes to VMMKit's types: absurd ones are clamped to the documented range (never a trap, an
// overflow or a huge allocation); ordinary ones behave as before.

@Suite("size limits: OutputSink, ExitPathProbe, MockCallLog")
struct SizeLimitTests {
    /// Collects the chunk sizes a sink hands out.
    private final class Chunks: @unchecked Sendable {
        var sizes: [Int] = []
    }

    /// The chunk sizes a sink of `capacity` hands out for `count` bytes without a newline, then a flush.
    private func chunkSizes(capacity: Int, count: Int) -> [Int] {
        let chunks = Chunks()
        let sink = OutputSink(capacity: capacity) { chunks.sizes.append($0.count) }
        let bytes = [UInt8](repeating: 0x41, count: count)
        bytes.withUnsafeBytes { sink.put(contentsOf: $0) }
        sink.flush()
        return chunks.sizes
    }

    @Test("an OutputSink's capacity is clamped to 1...maximumCapacity (capacity * 2 overflowed for a huge one)")
    func outputSinkCapacity() {
        let max = OutputSink.maximumCapacity
        #expect(max == 1 << 20)
        #expect(chunkSizes(capacity: Int.max, count: max + 10) == [max, 10])
        #expect(chunkSizes(capacity: max + 1, count: max + 10) == [max, 10])
        #expect(chunkSizes(capacity: max, count: max + 10) == [max, 10])
        #expect(chunkSizes(capacity: max - 1, count: max + 10) == [max - 1, 11])
        #expect(chunkSizes(capacity: 0, count: 3) == [1, 1, 1])
        #expect(chunkSizes(capacity: Int.min, count: 2) == [1, 1])
        #expect(chunkSizes(capacity: 64, count: 100) == [64, 36])
    }

    @Test("an ExitPathProbe's capacity is clamped to 1...maximumCapacity (no allocation of Int.max samples)")
    func exitPathProbeCapacity() {
        #expect(ExitPathProbe.maximumCapacity == 1 << 24)
        for capacity in [Int.max, ExitPathProbe.maximumCapacity + 1, 0, -1, Int.min] {
            #expect(ExitPathProbe(capacity: capacity).samples.isEmpty)
        }
    }

    @Test("MockCallLog.inject clamps count and skipping to 0...maximumInjectionCount (a negative count trapped)")
    func injectionCounts() throws {
        let mock = MockHypervisor()
        mock.log.inject(.badAddress, into: .getFPU, count: -1)
        mock.log.inject(.badAddress, into: .getFPU, count: Int.min, skipping: -5)
        #expect(mock.log.undeliveredFailures.isEmpty)
        mock.log.inject(.badAddress, into: .getFPU, count: 0, skipping: 3)
        #expect(mock.log.undeliveredFailures.isEmpty)
        mock.log.inject(.tryAgain, into: .getRegisters, count: Int.max, skipping: Int.max)
        #expect(mock.log.undeliveredFailures[.getRegisters]?.count == MockCallLog.maximumInjectionCount)
        mock.log.inject(.outOfMemory, into: .createVCPU, count: 2)
        #expect(mock.log.undeliveredFailures[.createVCPU] == [.outOfMemory, .outOfMemory])
    }
}

import Testing
import VMMKit
@testable import X86Disassembler

/// SplitMix64: a fixed-seed generator, so a failure reproduces.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

@Suite("Hostile bytes never crash the decoder")
struct FuzzTests {
    static let seed: UInt64 = 0x5eed_dec0_de00_0001

    @Test("random bytes in every mode: typed errors or instructions whose fields lie inside them")
    func randomBytes() throws {
        var rng = SplitMix64(state: FuzzTests.seed)
        let d = try X86Disassembler(mode: .bits64)
        var decoded = 0, refused = 0
        // Prefix-heavy and escape-heavy bytes reach the odd corners more often than uniform ones.
        let interesting: [UInt8] = [0x66, 0x67, 0xf0, 0xf2, 0xf3, 0x2e, 0x64, 0x65, 0x48, 0x41, 0x0f, 0x38, 0x3a,
                                    0xc4, 0xc5, 0x62, 0x8f, 0xe8, 0xe9, 0xff, 0xa1, 0xc8, 0xf6, 0xf7, 0x05, 0x04, 0x25]
        for n in 0..<30_000 {
            let count = Int.random(in: 0...16, using: &rng)
            let bytes = (0..<count).map { _ in
                Bool.random(using: &rng) ? interesting[Int.random(in: 0..<interesting.count, using: &rng)] : UInt8.random(in: 0...255, using: &rng)
            }
            let mode: X86Mode = [.bits64, .bits32, .bits16][n % 3]
            do {
                let i = try d.decode(bytes, address: UInt64.random(in: 0...UInt64.max, using: &rng), mode: mode)
                decoded += 1
                let e = i.encoding
                let inside = [e.displacement, e.immediate, e.secondImmediate, e.vectorPrefix].compactMap { $0 }
                    .allSatisfy { $0.offset >= 0 && $0.offset + $0.size <= i.length }
                if !(1...15).contains(i.length) || i.length > bytes.count || !inside || i.bytes != Array(bytes.prefix(i.length)) {
                    Issue.record("seed \(FuzzTests.seed) case \(n): \(bytes) decoded inconsistently: \(i)")
                    return
                }
                var r = Registers()
                r.rax = UInt64.random(in: 0...UInt64.max, using: &rng)
                for m in i.memoryOperands.compactMap(\.memory) { _ = i.effectiveAddress(of: m, registers: r) }
                _ = i.reproduces(X86ExitAccess(.memory(GuestAddress(r.rax)), width: 4, direction: .write), registers: r)
                _ = i.ioPort(registers: r)
            } catch {
                refused += 1
            }
            _ = d.candidatesEnding(at: UInt64(count), bytesBefore: bytes, mode: mode)
        }
        #expect(decoded > 10_000 && refused > 1_000, "decoded \(decoded), refused \(refused)")
    }

    @Test("random code and page tables: decoding at random addresses gives instructions or typed errors")
    func randomGuest() throws {
        var rng = SplitMix64(state: FuzzTests.seed ^ 1)
        let g = try PagedGuest()
        let d = try X86Disassembler()
        // Random code in both code pages, random bytes in part of the page tables' unused entries.
        try g.write((0..<8192).map { _ in UInt8.random(in: 0...255, using: &rng) }, at: 0x10000)
        var outcomes: [String: Int] = [:]
        // Every start in the last bytes before the unmapped page, then random ones.
        let edge = (0x11f00 as UInt64..<0x12000).map { $0 }
        for n in 0..<3000 + edge.count {
            // Mostly near the mapped pages and their edges, sometimes anywhere.
            let rip: UInt64 = n < edge.count ? edge[n] : Bool.random(using: &rng)
                ? 0x10000 + UInt64.random(in: 0..<0x3000, using: &rng)
                : UInt64.random(in: 0...UInt64.max, using: &rng)
            do throws(X86DecodeError) {
                let i = try d.decode(at: rip, in: g.context())
                outcomes[i.address == rip && i.length <= 15 ? "decoded" : "inconsistent", default: 0] += 1
            } catch {
                switch error {
                case .fetch: outcomes["fetch", default: 0] += 1
                case .codeEndsAt: outcomes["codeEndsAt", default: 0] += 1
                default: outcomes["invalid", default: 0] += 1
                }
            }
            _ = d.candidatesEnding(at: rip, in: try g.context())
        }
        #expect(outcomes["decoded", default: 0] > 500 && outcomes["fetch", default: 0] > 500, "\(outcomes)")
        #expect(outcomes["codeEndsAt", default: 0] > 0 && outcomes["inconsistent"] == nil, "\(outcomes)")
    }
}

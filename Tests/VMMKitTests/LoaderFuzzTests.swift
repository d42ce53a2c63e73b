import Testing
import VMMKit
import VMMKitTesting

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
struct XorShift: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state ^= state >> 12; state ^= state << 25; state ^= state >> 27
        return state &* 2685821657736338717
    }
}

@Suite("Loader mutation fuzzing")
struct LoaderFuzzTests {
    /// The repository's hello guest: a real ELF with PVH note and symbol table.
    static let seed: [UInt8] = {
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)
        return (try? ImageFile.read(parts.joined(separator: "/") + "/Guests/hello.elf")) ?? []
    }()

    @Test("5,000 mutated images: each loads or fails with a typed error, never crashes")
    func mutate() throws {
        let seed = LoaderFuzzTests.seed
        try #require(seed.count > 1000, "Guests/hello.elf is readable")
        _ = try ELFImage(bytes: seed)
        var rng = XorShift(state: 0x9e37_79b9_7f4a_7c15)
        let vm = try makeVM(MockHypervisor(), memory: 32 << 20)
        var loaded = 0, refused = 0
        for _ in 0..<5000 {
            var b = seed
            switch rng.next() % 4 {
            case 0: // flip bytes in the headers, where the interesting fields are
                for _ in 0..<(1 + Int(rng.next() % 8)) { b[Int(rng.next() % 512)] ^= UInt8(truncatingIfNeeded: rng.next()) }
            case 1: // plant extreme values in header fields
                let at = Int(rng.next() % 248) & ~7
                let v: UInt64 = [0, .max, 0x8000_0000_0000_0000, 0xffff_ffff, UInt64(b.count), 1 << 40].randomElement(using: &rng) ?? 0
                for i in 0..<8 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
            case 2: // truncate
                b = Array(b.prefix(Int(rng.next() % UInt64(b.count))))
            default: // random bytes anywhere
                for _ in 0..<32 { b[Int(rng.next() % UInt64(b.count))] = UInt8(truncatingIfNeeded: rng.next()) }
            }
            do {
                _ = try X86Boot.load(.elf(b), commandLine: "x=1", into: vm)
                loaded += 1
            } catch VMError.loader {
                refused += 1
            } catch {
                Issue.record("unexpected error kind: \(error)")
            }
        }
        #expect(loaded + refused == 5000)
        #expect(refused > 1000, "mutations do get refused (\(refused))")
    }
}

@Suite("Exit fuzzing on the mock backend")
struct ExitFuzzTests {
    @Test("random exits against the standard devices end in a stop or a typed error, never a crash", arguments: 0..<20)
    func randomExits(seed: UInt64) throws {
        var rng = XorShift(state: 0x1234_5678_9abc_def1 &+ seed &* 0x9e37_79b9)
        let mock = MockHypervisor()
        let vm = try makeVM(mock, memory: 32 << 20)
        try StandardDevices.install(on: vm, console: CapturedOutput().sink())
        var steps: [MockStep] = []
        let ports: [UInt16] = [0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3ff, 0x700, 0x80, 0xffff, 0x702]
        let addrs: [UInt64] = [0xd000_0000, 0xd000_0004, 0xd000_0008, 0xd000_0010, 0xd000_0014, 0xd000_0040, 0xd000_0fff, 0, .max, 0xe0_0000]
        for _ in 0..<300 {
            let dir: AccessDirection = rng.next() & 1 == 0 ? .read : .write
            switch rng.next() % 10 {
            case 0..<5:
                let count = UInt32(rng.next() % 3)
                let data = (0..<Int(count)).map { _ in rng.next() }
                steps.append(.exit(.io(PortIO(port: ports[Int(rng.next() % UInt64(ports.count))], size: UInt8(rng.next() % 9),
                                             count: count, direction: dir, value: rng.next())), data: data))
            case 5..<8:
                steps.append(.exit(.mmio(MMIOAccess(address: GuestAddress(addrs[Int(rng.next() % UInt64(addrs.count))] &+ rng.next() % 4),
                                                   size: UInt8(rng.next() % 12), direction: dir, value: rng.next()))))
            case 8:
                steps.append(.exit(.msrRead(index: UInt32(truncatingIfNeeded: rng.next()))))
            default:
                steps.append(.fail(.interrupted))
            }
        }
        steps.append(.exit([VMExit.shutdown, .unsupported(reason: 77, name: "x"), .halt, .systemEvent(type: 1, flags: 0)][Int(rng.next() % 4)]))
        mock.vcpu(0)?.script(steps)
        // Either a stop reason or a typed VMError with a message; reaching here means no crash or hang.
        do {
            _ = try vm.run()
        } catch let e as VMError {
            #expect(!e.description.isEmpty)
        } catch {
            Issue.record("untyped error: \(error)")
        }
    }
}

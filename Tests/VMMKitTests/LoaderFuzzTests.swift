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
                let image = try X86Boot.load(.elf(b), commandLine: "x=1", into: vm)
                loaded += 1
                try checkLoaded(image, bytes: b, in: vm)
            } catch VMError.loader {
                refused += 1
            } catch {
                Issue.record("unexpected error kind: \(error)")
            }
        }
        #expect(refused > 1000, "mutations do get refused (\(refused))")
        #expect(loaded > 100, "mutations outside what matters still load (\(loaded))")
    }

    /// What an accepted image must look like in guest memory: the parser agrees,
    /// every segment's file bytes are there and its zero fill is zero, and the
    /// entry point lies inside a loaded segment.
    func checkLoaded(_ image: LoadedImage, bytes: [UInt8], in vm: VirtualMachine) throws {
        let elf = try ELFImage(bytes: bytes)
        for seg in elf.segments where seg.memorySize > 0 {
            let fileBytes = Int(min(seg.fileSize, 1 << 16))
            if fileBytes > 0 {
                let start = Int(seg.fileOffset)
                let inMemory = try vm.memory.readBytes(at: GuestAddress(seg.physicalAddress), count: fileBytes)
                #expect(inMemory[...] == bytes[start..<start + fileBytes], "segment at 0x\(String(seg.physicalAddress, radix: 16)) holds its file bytes")
            }
            let fill = Int(min(seg.memorySize - seg.fileSize, 1 << 16))
            if fill > 0 {
                let zeros = try vm.memory.readBytes(at: GuestAddress(seg.physicalAddress + seg.fileSize), count: fill)
                #expect(zeros.allSatisfy { $0 == 0 }, "zero fill after the file bytes")
            }
        }
        let entry: UInt64
        switch image.entry {
        case .pvh(let e): entry = UInt64(e)
        case .long64(let e): entry = e
        }
        #expect(image.segments.contains { $0.contains(GuestAddress(entry)) }, "entry 0x\(String(entry, radix: 16)) inside a segment")
    }
}

@Suite("Exit fuzzing on the mock backend")
struct ExitFuzzTests {
    /// How a script's last exit ends the run when nothing before it does.
    enum Ending: CaseIterable { case shutdown, unknownReason, halt, systemEvent }

    @Test("random exits of the shapes KVM produces: every read gets a value per element, the run ends as its last exit says", arguments: 0..<20)
    func randomExits(seed: UInt64) throws {
        var rng = XorShift(state: 0x1234_5678_9abc_def1 &+ seed &* 0x9e37_79b9)
        let mock = MockHypervisor()
        let vm = try makeVM(mock, memory: 32 << 20)
        try StandardDevices.install(on: vm, console: CapturedOutput().sink())
        var steps: [MockStep] = []
        // What each consumed exit must have had completed: the element indices a read returns (-1: a rejected MSR).
        var expectedReads: [[Int]] = []
        let ports: [UInt16] = [0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3ff, 0x700, 0x80, 0xffff, 0x702]
        let addrs: [UInt64] = [0xd000_0000, 0xd000_0004, 0xd000_0008, 0xd000_0010, 0xd000_0014, 0xd000_0040, 0xd000_0ff8, 0xe0_0000_0000]
        for _ in 0..<300 {
            let dir: AccessDirection = rng.next() & 1 == 0 ? .read : .write
            switch rng.next() % 10 {
            case 0..<5:
                // KVM: sizes 1, 2, 4; count 1, or a string I/O run that fits its one-page data area.
                let size = [UInt8(1), 2, 4][Int(rng.next() % 3)]
                let count = rng.next() % 4 == 0 ? UInt32(2 + rng.next() % UInt64(4096 / Int(size) - 1)) : 1
                let data = dir == .write ? (0..<Int(count)).map { _ in rng.next() & (UInt64.max >> (64 - 8 * UInt64(size))) } : []
                let port = ports[Int(rng.next() % UInt64(ports.count))]
                steps.append(.exit(.io(PortIO(port: port, size: size, count: count, direction: dir,
                                             value: count == 1 ? (data.first ?? 0) : 0)), data: data))
                expectedReads.append(dir == .read ? Array(0..<Int(count)) : [])
            case 5..<8:
                // KVM: 1 to 8 bytes (a split access gives any length), naturally or not aligned.
                let size = UInt8(1 + rng.next() % 8)
                let value = rng.next() & (UInt64.max >> (64 - 8 * UInt64(size)))
                steps.append(.exit(.mmio(MMIOAccess(address: GuestAddress(addrs[Int(rng.next() % UInt64(addrs.count))] &+ rng.next() % 8),
                                                   size: size, direction: dir, value: dir == .write ? value : 0))))
                expectedReads.append(dir == .read ? [0] : [])
            case 8:
                steps.append(.exit(.msrRead(index: UInt32(truncatingIfNeeded: rng.next()))))
                expectedReads.append([-1])
            default:
                steps.append(.fail(.interrupted))
            }
        }
        let ending = Ending.allCases[Int(rng.next() % 4)]
        switch ending {
        case .shutdown: steps.append(.exit(.shutdown))
        case .unknownReason: steps.append(.exit(.unsupported(reason: 77)))
        case .halt: steps.append(.exit(.halt))
        case .systemEvent: steps.append(.exit(.systemEvent(type: 1, flags: 0)))
        }
        let v = try #require(mock.vcpu(0))
        v.script(steps)
        let outcome: Result<StopReason, VMError>
        do { outcome = .success(try vm.run()) } catch { outcome = .failure(error) }

        // Nothing before the last exit stops this VM: every step ran, and the run ends as that exit says.
        #expect(mock.finish().isEmpty, "\(outcome)")
        switch (ending, outcome) {
        case (.halt, .success(.halted)), (.systemEvent, .success(.systemEvent(type: 1))): break
        case (.shutdown, .failure(.guestFault(let f))) where f.kind == .tripleFault: break
        case (.unknownReason, .failure(.unhandledExit(_, .unsupported(77), _))): break
        default: Issue.record("ending \(ending) gave \(outcome)")
        }
        // Every read got a value for each of its elements, and nothing else was supplied. The exit the
        // VM stopped on (a halt or a system event) has no access for KVM to complete, so no further
        // KVM_RUN is made for it.
        let completed = v.completedReads
        let exitsCompleted = expectedReads.count
        #expect(completed.count == exitsCompleted)
        for (i, want) in expectedReads.enumerated() where i < completed.count {
            #expect(completed[i].keys.sorted() == want, "exit \(i): \(steps.filter { if case .exit = $0 { true } else { false } }[i])")
        }
    }
}

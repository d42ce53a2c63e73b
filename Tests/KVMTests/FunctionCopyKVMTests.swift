import DMP
import Testing
import VMMKit
import X86Disassembler

/// The function-copy fixtures (gcc -O2, `Tests/DMPTests/Fixtures`, linked at 0x401000) in a tiny CPL0
/// guest: a driver built with DMP's assembler calls each function on fixed inputs and stores `rax`.
/// The same driver runs against the originals, against copies entered through their patched entries,
/// and against evicted copies; the results must be identical.
enum CopyGuest {
    static let elf: [UInt8]? = {
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(2) // KVMTests/FunctionCopyKVMTests.swift
        return try? ImageFile.read(parts.joined(separator: "/") + "/DMPTests/Fixtures/copyfixtures.elf")
    }()
    static let base: UInt64 = 0x40_0000
    static let driver: UInt64 = 0x40_4000
    static let copies: UInt64 = 0x41_0000
    static let results: UInt64 = 0x42_0000
    static let enable: UInt64 = 0x42_1000
    static let hits: UInt64 = 0x42_1008
    static let size: UInt64 = 0x2_2000
    static let table: UInt64 = 0x40_3060 // int table[16]

    /// (function, edi, esi) for every call the driver makes.
    static let cases: [(String, UInt64, UInt64)] = [
        ("helper", 5, 0), ("helper", 0xffff_fffd, 0), ("calls", 4, 0), ("calls", 10, 0), ("tail", 2, 0),
        ("sum_loop", table, 16), ("sum_loop", table, 5), ("sum_loop", table, 0),
        ("count_loop", 0, 9), ("count_loop", 7, 6), ("count_loop", 40, 3),
        ("near_limit", 0, 9), ("near_limit", 1, 0), ("near_limit", 3, 7), ("near_limit", 2, 20),
        ("rip_data", 3, 0), ("rip_data", 7, 0), ("rip_data", 20, 0), ("checked", 6, 0), ("checked", 0, 0),
        ("two_calls", 3, 0), ("cet_loop", table, 16), ("cet_loop", table, 3), ("cet_load", 1, 0), ("cet_load", 100, 0),
        ("post_delay", 10, 0),
    ] + (0...8).map { ("classify", UInt64($0), 30) } + (0...7).map { ("cet_switch", UInt64($0), 0) }

    /// How a run reaches the functions.
    enum Mode { case originals, enteredCopies, evictedCopies, rebuiltCopies }
    /// Where a rebuild puts the new copies (the old ones stay at ``copies``).
    static let rebuilt: UInt64 = 0x41_4000

    /// What one run produced.
    struct Outcome {
        var results: [UInt64]
        var port80Writes: Int
        var hits: UInt64
        var entries: [CopyEntry.Kind: Int]
    }

    static func run(_ mode: Mode) throws -> Outcome {
        let elfImage = try ELFImage(bytes: try #require(elf))
        var memory = [UInt8](repeating: 0, count: Int(size))
        for s in elfImage.segments {
            let bytes = Array(try #require(elf)[Int(s.fileOffset)..<Int(s.fileOffset + s.fileSize)])
            memory.replaceSubrange(Int(s.virtualAddress - base)..<Int(s.virtualAddress - base) + bytes.count, with: bytes)
        }
        let text = try #require(elfImage.segments.first { $0.executable })
        let image = CodeImage(regions: [.init(address: text.virtualAddress,
                                              bytes: Array(memory[Int(text.virtualAddress - base)..<Int(text.virtualAddress - base + text.memorySize)]))],
                              symbols: elfImage.symbols)
        let d = try X86Disassembler()
        func symbol(_ name: String) throws -> GuestSymbol { try #require(elfImage.symbols.symbols.first { $0.name == name }) }

        // The copies, one per function, 1 KiB apart; post_delay's `out 0x80, al` becomes a discard body.
        let names = Array(Set(cases.map(\.0))).sorted()
        var copyOf: [String: FunctionCopy] = [:]
        var newCopyOf: [String: FunctionCopy] = [:]
        for (k, name) in names.enumerated() {
            let f = try image.decode(try symbol(name), disassembler: d)
            var rewrites: [HotRewrite] = []
            if mode == .rebuiltCopies {
                // The old copies have no body yet (the delay write was not hot); the rebuilt ones have it.
                newCopyOf[name] = try FunctionCopy(f, at: rebuilt + UInt64(k) * 0x400, rewrites: try delayBody(f))
                #expect(try #require(newCopyOf[name]).bytes.count <= 0x400)
            } else if name == "post_delay", let out = f.instructions.first(where: { $0.mnemonic == "out" }) {
                let route = FastPathRoute(target: .port(0x80), width: 1, direction: .write, kind: .discardWrite,
                                          enableWord: enable, hitCounter: hits)
                rewrites.append(HotRewrite(address: out.address) { a throws(DMPRefusal) in
                    try FastPathEmitter.emitBody(for: out, routes: [route], into: &a)
                })
            }
            let copy = try FunctionCopy(f, at: copies + UInt64(k) * 0x400, rewrites: rewrites)
            #expect(copy.bytes.count <= 0x400)
            copyOf[name] = copy
        }

        // Where the driver calls each function, and which writes go in.
        var callTarget: [String: UInt64] = [:]
        var writes: [PatchWrite] = []
        var kinds: [CopyEntry.Kind: Int] = [:]
        for name in names {
            let copy = try #require(copyOf[name])
            switch mode {
            case .originals:
                callTarget[name] = copy.function.start
            case .evictedCopies:
                callTarget[name] = copy.address
                writes += copy.evictionWrites
            case .rebuiltCopies:
                // Threads still in the old copy leave it at its pads, for the new copy's corresponding points.
                callTarget[name] = copy.address
                writes += copy.evictionWrites(to: try #require(newCopyOf[name]))
            case .enteredCopies:
                var entries: [CopyEntry] = []
                var used = writes.map(\.range)
                for h in copy.pieces where h.kind == .rewritten {
                    if let e = try? copy.deadPaddingEntry(hot: h.original, in: image, disassembler: d, avoiding: used) {
                        entries.append(e)
                        used += e.writes.map(\.range)
                    }
                }
                if let e = try? copy.functionEntry() { entries.append(e) }
                else if let e = try? copy.entryThroughPadding(in: image, disassembler: d, avoiding: used) { entries.append(e) }
                for site in image.callSites(to: copy.function.start, disassembler: d) {
                    if let e = try? copy.callSiteEntry(site) { entries.append(e) }
                }
                var enteredAtStart = false
                for e in entries where !e.writes.contains(where: { w in writes.contains { $0.range.overlaps(w.range) } }) {
                    writes += e.writes
                    kinds[e.kind, default: 0] += 1
                    if [.functionEntry, .entryThroughPadding, .deadPadding].contains(e.kind) { enteredAtStart = true }
                }
                // Called at the original when an entry there leads into the copy, else at the copy itself.
                callTarget[name] = enteredAtStart ? copy.function.start : copy.address
            }
        }
        if mode != .originals {
            for c in Array(copyOf.values) + Array(newCopyOf.values) {
                memory.replaceSubrange(Int(c.address - base)..<Int(c.end - base), with: c.bytes)
            }
        }
        for w in writes {
            let at = Int(w.address - base)
            #expect(Array(memory[at..<at + w.original.count]) == w.original, "a write finds the bytes it expects")
            memory.replaceSubrange(at..<at + w.replacement.count, with: w.replacement)
        }

        // The driver: for each case, edi/esi, call, store rax; then exit 0 through port 0xf4.
        var a = X86Assembler(origin: driver)
        for (k, c) in cases.enumerated() {
            try a.mov(.edi, immediate: c.1)
            try a.mov(.esi, immediate: c.2)
            try a.call(.absolute(try #require(callTarget[c.0])))
            try a.mov(.at(results + 8 * UInt64(k)), .rax)
        }
        a.raw([0x31, 0xc0, 0xe6, 0xf4, 0xf4]) // xor eax, eax; out 0xf4, al; hlt
        let code = try a.finish()
        memory.replaceSubrange(Int(driver - base)..<Int(driver - base) + code.count, with: code)
        memory.replaceSubrange(Int(enable - base)..<Int(enable - base) + 8, with: [1, 0, 0, 0, 0, 0, 0, 0])

        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        let port80 = Recorder()
        try vm.bus.attach(port80, ports: 0x80..<0x81)
        _ = try X86Boot.load(.flat(memory, loadAddress: base, entry: driver), into: vm)
        #expect(try vm.run() == .guestExit(status: 0))
        let out = try vm.memory.readBytes(at: GuestAddress(results), count: 8 * cases.count)
        let values = (0..<cases.count).map { k in (0..<8).reduce(UInt64(0)) { $0 | UInt64(out[8 * k + $1]) << (8 * UInt64($1)) } }
        return Outcome(results: values, port80Writes: port80.writes.count,
                       hits: try vm.memory.read(UInt64.self, at: GuestAddress(hits)), entries: kinds)
    }

    /// post_delay's `out 0x80, al` as a discard body (no rewrite for the other functions).
    static func delayBody(_ f: DecodedFunction) throws -> [HotRewrite] {
        guard f.symbol.name == "post_delay", let out = f.instructions.first(where: { $0.mnemonic == "out" }) else { return [] }
        let route = FastPathRoute(target: .port(0x80), width: 1, direction: .write, kind: .discardWrite, enableWord: enable, hitCounter: hits)
        return [HotRewrite(address: out.address) { a throws(DMPRefusal) in try FastPathEmitter.emitBody(for: out, routes: [route], into: &a) }]
    }
}

extension KVMTests {
    @Test("gcc -O2 functions and their copies give the same results: entered through patched entries, evicted, and evicted for a rebuilt copy")
    func functionCopies() throws {
        let original = try CopyGuest.run(.originals)
        // Spot checks against C: helper(5) = 36, calls(4) = helper(4) + 2 helper(5) = 29 + 72, classify(2, 30) = helper(30) + 3.
        #expect(original.results[0] == 36 && original.results[2] == 101)
        let classify2 = try #require(CopyGuest.cases.firstIndex { $0.0 == "classify" && $0.1 == 2 })
        #expect(original.results[classify2] == 214)
        #expect(original.port80Writes == 10 && original.hits == 0)

        let entered = try CopyGuest.run(.enteredCopies)
        #expect(entered.results == original.results)
        #expect(entered.port80Writes == 0, "post_delay's out 0x80 is served in the copy")
        #expect(entered.hits == 10)
        #expect(entered.entries[.functionEntry, default: 0] >= 3 && entered.entries[.callSite, default: 0] >= 3)
        #expect(entered.entries[.tailCallSite, default: 0] >= 1 && entered.entries[.deadPadding] == 1)
        #expect(entered.entries[.entryThroughPadding, default: 0] >= 4, "\(entered.entries)")

        let evicted = try CopyGuest.run(.evictedCopies)
        #expect(evicted.results == original.results)
        #expect(evicted.port80Writes == 10 && evicted.hits == 0, "an evicted copy leaves at its loop-head pad before the body")

        // Evicted in favour of a rebuilt copy: every call starts in the old copy and moves on at its first pad.
        let rebuilt = try CopyGuest.run(.rebuiltCopies)
        #expect(rebuilt.results == original.results)
        #expect(rebuilt.port80Writes == 0 && rebuilt.hits == 10, "the old copy's loop-head pad leads to the new copy, whose body serves the delay")
    }
}

@testable import DMP
import Testing
import VMMKit
import X86Disassembler

/// The fixtures' image: gcc -O2 code at 0x401000 with its sized symbols.
let fixtureImage = CodeImage(
    regions: [.init(address: CopyFixtures.text.address, bytes: CopyFixtures.text.bytes)],
    symbols: SymbolTable(CopyFixtures.symbols.map { GuestSymbol(name: $0.name, address: $0.address, size: $0.size, isFunction: $0.isFunction) }))

/// Where the tests place copies: an implant-like address within ±2 GiB of the fixtures.
let copyPlacement: UInt64 = 0x60_0000

func fixtureSymbol(_ name: String) throws -> GuestSymbol {
    try #require(fixtureImage.symbols.symbols.first { $0.name == name }, "no fixture symbol \(name)")
}

func decodeFixture(_ name: String, _ d: X86Disassembler) throws -> DecodedFunction {
    try fixtureImage.decode(try fixtureSymbol(name), disassembler: d)
}

/// A function made of `bytes` at `address`, as its own one-function image.
func handMade(_ bytes: [UInt8], at address: UInt64 = 0x40_0000, name: String = "f") -> (CodeImage, GuestSymbol) {
    let s = GuestSymbol(name: name, address: address, size: UInt64(bytes.count), isFunction: true)
    return (CodeImage(regions: [.init(address: address, bytes: bytes)], symbols: SymbolTable([s])), s)
}

/// The single instruction at `address` of `bytes` (which start at `base`).
func instruction(in bytes: [UInt8], base: UInt64, at address: UInt64, _ d: X86Disassembler) throws -> X86Instruction {
    let k = Int(address - base)
    return try d.decode(Array(bytes[k...].prefix(15)), address: address)
}

/// Decodes the copy piece by piece and checks each against the original: copied bytes identical, pads the
/// 5-byte NOP, relocated branches the same operation with the target mapped (inside → the copy's point,
/// outside → the original target), RIP-relative operands reaching the same data, the exit jumping to the end.
func expectRoundTrip(_ copy: FunctionCopy, _ d: X86Disassembler, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let f = copy.function
    func mapped(_ t: UInt64) -> UInt64 { f.contains(t) ? (copy.copyAddress(of: t) ?? 0) : t }
    // The whole copy decodes with no gaps, ending exactly at its end.
    let all = d.decodeAll(copy.bytes, address: copy.address)
    #expect(all.reduce(0) { $0 + $1.length } == copy.bytes.count, "the copy decodes whole", sourceLocation: sourceLocation)
    for p in copy.pieces {
        let bytes = Array(copy.bytes[Int(p.copy.lowerBound - copy.address)..<Int(p.copy.upperBound - copy.address)])
        switch p.kind {
        case .pad:
            #expect(bytes == CopyEncoding.nop5, sourceLocation: sourceLocation)
        case .exit:
            let j = try d.decode(bytes, address: p.copy.lowerBound)
            #expect(j.mnemonic == "jmp" && j.branch?.target == f.end, sourceLocation: sourceLocation)
        case .copied:
            let o = try #require(f.index(at: p.original).map { f.instructions[$0] })
            #expect(bytes == o.bytes, "\(o) copied as is", sourceLocation: sourceLocation)
        case .rewritten:
            break
        case .relocated:
            let o = try #require(f.index(at: p.original).map { f.instructions[$0] })
            let c = try d.decode(bytes, address: p.copy.lowerBound)
            if let b = o.branch {
                if [0xe0, 0xe1, 0xe2, 0xe3].contains(o.encoding.opcode) && o.encoding.map == .primary {
                    // op +2; jmp +5; jmp rel32 target
                    #expect(c.mnemonic == o.mnemonic && c.branch?.target == p.copy.lowerBound + UInt64(c.length) + 2, sourceLocation: sourceLocation)
                    let tail = d.decodeAll(Array(bytes[c.length...]), address: c.nextAddress)
                    #expect(tail.map(\.mnemonic) == ["jmp", "jmp"] && tail[0].branch?.target == p.copy.upperBound, sourceLocation: sourceLocation)
                    #expect(tail.last?.branch?.target == mapped(b.target), sourceLocation: sourceLocation)
                } else {
                    #expect(c.mnemonic == o.mnemonic, "\(c) relocates \(o)", sourceLocation: sourceLocation)
                    #expect(c.length == bytes.count && c.branch?.target == mapped(b.target), "\(o) → \(c)", sourceLocation: sourceLocation)
                    #expect(c.branch?.field.size == 4, "relaxed to rel32", sourceLocation: sourceLocation)
                }
            } else {
                #expect(o.encoding.isRIPRelative && c.encoding.isRIPRelative, sourceLocation: sourceLocation)
                #expect(c.mnemonic == o.mnemonic && c.operandText.prefix(3) == o.operandText.prefix(3), sourceLocation: sourceLocation)
                let od = try #require(o.encoding.displacement?.signedValue(in: o.bytes))
                let cd = try #require(c.encoding.displacement?.signedValue(in: c.bytes))
                #expect(o.nextAddress &+ UInt64(bitPattern: od) == c.nextAddress &+ UInt64(bitPattern: cd), "\(o) reaches the same data", sourceLocation: sourceLocation)
            }
        }
    }
    // The offset map covers every original instruction and agrees with the reverse map.
    #expect(copy.offsetMap.count == f.instructions.count, sourceLocation: sourceLocation)
    for (o, c) in copy.offsetMap { #expect(copy.originalAddress(of: c) == o, sourceLocation: sourceLocation) }
}

@Suite("Function copy: decoding whole")
struct FunctionDecodeTests {
    @Test("every gcc -O2 fixture function decodes whole, ending exactly at its symbol's end")
    func fixturesDecodeWhole() throws {
        let d = try X86Disassembler()
        let functions = fixtureImage.symbols.symbols.filter(\.isFunction)
        #expect(functions.count >= 20)
        for s in functions {
            let f = try fixtureImage.decode(s, disassembler: d)
            #expect(f.instructions.first?.address == s.address)
            #expect(f.instructions.last?.nextAddress == s.address + s.size, "\(s.name)")
            #expect(zip(f.instructions, f.instructions.dropFirst()).allSatisfy { $0.nextAddress == $1.address }, "\(s.name) has no gaps")
        }
    }

    @Test("the committed ELF (the real-KVM test loads it) holds the same text and symbols as CopyFixtures.swift")
    func fixtureELF() throws {
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast() // FunctionCopyTests.swift
        let bytes = try ImageFile.read(parts.joined(separator: "/") + "/Fixtures/copyfixtures.elf")
        let elf = try ELFImage(bytes: bytes)
        let text = try #require(elf.segments.first { $0.executable })
        #expect(text.virtualAddress == CopyFixtures.text.address)
        #expect(Array(bytes[Int(text.fileOffset)..<Int(text.fileOffset + text.fileSize)]) == CopyFixtures.text.bytes)
        let sized = elf.symbols.symbols.filter { $0.size > 0 }
        #expect(Set(sized.map(\.name)) == Set(CopyFixtures.symbols.map(\.name)))
        #expect(sized == fixtureImage.symbols.symbols)
    }

    @Test("a symbol size that cuts an instruction, a size of 0, a data symbol and invalid bytes are refused")
    func boundaries() throws {
        let d = try X86Disassembler()
        var s = try fixtureSymbol("sum_loop")
        s.size = 3 // test esi,esi (2) + half of the jle rel8
        let cut = try #require(throws: DMPRefusal.self) { try fixtureImage.decode(s, disassembler: d) }
        #expect(cut.stage == .plan && cut.reason.contains("does not end at its symbol's end"))
        s.size = 0
        #expect(try #require(throws: DMPRefusal.self) { try fixtureImage.decode(s, disassembler: d) }.reason.contains("no symbol size"))
        let table = try fixtureSymbol("table")
        #expect(try #require(throws: DMPRefusal.self) { try DecodedFunction.decode(table, bytes: CopyFixtures.data.bytes, disassembler: d) }
            .reason.contains("not a function symbol"))
        let (img, bad) = handMade([0x31, 0xc0, 0x06, 0xc3]) // xor eax,eax; push es (invalid in 64-bit mode)
        #expect(try #require(throws: DMPRefusal.self) { try img.decode(bad, disassembler: d) }.reason.contains("invalid bytes at f+0x2"))
        let (img2, mid) = handMade([0x74, 0x01, 0xb8, 0x01, 0x00, 0x00, 0x00, 0xc3]) // je into the mov's immediate
        #expect(try #require(throws: DMPRefusal.self) { try img2.decode(mid, disassembler: d) }.reason.contains("lands inside an instruction"))
    }

    @Test("loop heads are the targets of backward branches")
    func loopHeads() throws {
        let d = try X86Disassembler()
        #expect(try decodeFixture("uart_puts", d).loopHeads == [0x4010c8])
        #expect(try decodeFixture("count_loop", d).loopHeads == [0x401026])
        #expect(try decodeFixture("calls", d).loopHeads.isEmpty)
    }
}

@Suite("Function copy: refusals (DESIGN.md step 4)")
struct FunctionCopyRefusalTests {
    static let cases: [(name: String, bytes: [UInt8], reason: String)] = [
        ("xbegin", [0xc7, 0xf8, 0x01, 0x00, 0x00, 0x00, 0x90, 0xc3], "xbegin"),
        ("66-prefixed jmp rel32", [0x66, 0xe9, 0x00, 0x00, 0x00, 0x00, 0xc3], "66-prefixed branch"),
        ("66-prefixed ret", [0x31, 0xc0, 0x66, 0xc3], "66-prefixed branch"),
        ("66-prefixed jcc rel8", [0x66, 0x74, 0x00, 0xc3], "66-prefixed branch"),
        ("bnd jmp", [0x85, 0xc0, 0x74, 0x06, 0xf2, 0xe9, 0x00, 0x00, 0x00, 0x00, 0xc3], "bnd-prefixed branch"),
        ("bnd ret", [0xf2, 0xc3], "bnd-prefixed branch"),
        ("bnd call", [0xf2, 0xff, 0xd0, 0xc3], "bnd-prefixed branch"),
        ("ud2", [0x85, 0xc0, 0x75, 0x02, 0x0f, 0x0b, 0xc3], "ud2"),
        ("int 0x80", [0xcd, 0x80, 0xc3], "int 0x80"),
        ("int3", [0xcc, 0xc3], "int3"),
        ("syscall", [0x0f, 0x05, 0xc3], "syscall"),
        ("sysenter", [0x0f, 0x34, 0xc3], "sysenter"),
        ("call to the next instruction", [0xe8, 0x00, 0x00, 0x00, 0x00, 0x58, 0xc3], "call to the next instruction"),
        ("RIP-relative into the function", [0x8b, 0x05, 0x00, 0x00, 0x00, 0x00, 0xc3], "RIP-relative operand pointing inside the function"),
        ("lea of its own code (computed goto)", [0x48, 0x8d, 0x05, 0xf9, 0xff, 0xff, 0xff, 0xff, 0xe0], "RIP-relative operand pointing inside the function"),
        ("absolute jump table inside", [0xff, 0x24, 0xc5, 0x08, 0x00, 0x40, 0x00, 0xc3, 0x00, 0x00], "absolute address inside the function"),
        ("own address as an immediate", [0xb8, 0x06, 0x00, 0x40, 0x00, 0xc3, 0xc3], "immediate holding an address inside the function"),
    ]

    @Test("each instruction DESIGN.md names is refused, with its reason", arguments: 0..<cases.count)
    func refused(_ k: Int) throws {
        let d = try X86Disassembler()
        let c = Self.cases[k]
        let (img, s) = handMade(c.bytes)
        let r = try #require(throws: DMPRefusal.self, "\(c.name)") {
            let f = try img.decode(s, disassembler: d)
            _ = try FunctionCopy(f, at: copyPlacement)
        }
        #expect(r.stage == .plan && r.reason.contains(c.reason), "\(c.name): \(r.reason)")
    }

    @Test("notrack indirect jumps and rep ret are not refused: they stay as they are")
    func notRefused() throws {
        let d = try X86Disassembler()
        let (img, s) = handMade([0x3e, 0xff, 0xe0, 0xf3, 0xc3]) // notrack jmp rax; rep ret
        let copy = try FunctionCopy(try img.decode(s, disassembler: d), at: copyPlacement)
        #expect(copy.bytes == [0x3e, 0xff, 0xe0, 0xf3, 0xc3])
        #expect(copy.indirectJumps == [s.address])
    }

    @Test("a function named in a code-address table is refused")
    func codeAddressTable() throws {
        let d = try X86Disassembler()
        let f = try decodeFixture("rip_data", d)
        let table = CodeAddressTable(name: "__ex_table", addresses: [0x1234, f.start + 6])
        let r = try #require(throws: DMPRefusal.self) { try FunctionCopy(f, at: copyPlacement, tables: [table]) }
        #expect(r.reason == "rip_data is named in __ex_table at rip_data+0x6 (a copy would freeze or break that table)")
        _ = try FunctionCopy(f, at: copyPlacement, tables: [CodeAddressTable(name: "__jump_table", addresses: [f.end])])
    }

    @Test("a target beyond ±2 GiB of the copy is refused")
    func beyondReach() throws {
        let d = try X86Disassembler()
        let far: UInt64 = 0x4000_0000_0000
        for name in ["rip_data", "calls", "checked"] { // RIP-relative data, calls outside, a jcc into f.cold
            let r = try #require(throws: DMPRefusal.self) { try FunctionCopy(try decodeFixture(name, d), at: far) }
            #expect(r.reason.contains("beyond ±2 GiB"), "\(name): \(r.reason)")
        }
    }

    @Test("hot addresses must be instruction starts and not branches")
    func hotAddresses() throws {
        let d = try X86Disassembler()
        let f = try decodeFixture("uart_puts", d)
        let body = HotRewrite(address: f.start + 1, bytes: [0x90])
        #expect(try #require(throws: DMPRefusal.self) { try FunctionCopy(f, at: copyPlacement, rewrites: [body]) }
            .reason.contains("not an instruction start"))
        let branch = HotRewrite(address: 0x4010df, bytes: [0x90]) // jne
        #expect(try #require(throws: DMPRefusal.self) { try FunctionCopy(f, at: copyPlacement, rewrites: [branch]) }
            .reason.contains("is a branch"))
        let empty = HotRewrite(address: 0x4010d8) { _ in }
        #expect(try #require(throws: DMPRefusal.self) { try FunctionCopy(f, at: copyPlacement, rewrites: [empty]) }
            .reason.contains("0 bytes"))
        let refusing = HotRewrite(address: 0x4010d8) { _ throws(DMPRefusal) in throw DMPRefusal(.encode, "no body") }
        #expect(try #require(throws: DMPRefusal.self) { try FunctionCopy(f, at: copyPlacement, rewrites: [refusing]) }.stage == .encode)
    }
}

@Suite("Function copy: relocation")
struct FunctionCopyRelocationTests {
    @Test("every copyable fixture function round-trips through the decoder")
    func allFixtures() throws {
        let d = try X86Disassembler()
        for s in fixtureImage.symbols.symbols where s.isFunction {
            let copy = try FunctionCopy(try fixtureImage.decode(s, disassembler: d), at: copyPlacement + 0x1000)
            try expectRoundTrip(copy, d)
        }
    }

    @Test("uart_puts: hot in and out replaced by their bodies, a pad at the loop head, indirect nothing")
    func uartPuts() throws {
        let d = try X86Disassembler()
        let f = try decodeFixture("uart_puts", d)
        // Bodies that record where they were emitted: `mov al, imm8` stands for a fast path's read, `nop` for a write.
        let inBody = HotRewrite(address: 0x4010ca) { a in a.raw([0xb0, 0x20] + (a.position == copyPlacement + 35 ? [] : [0xcc])) }
        let outBody = HotRewrite(address: 0x4010d8, bytes: [0x90, 0x90, 0x90])
        let copy = try FunctionCopy(f, at: copyPlacement, rewrites: [inBody, outBody])
        try expectRoundTrip(copy, d)
        // Layout: movzx(3) test(3) je→jcc32(6) mov(5) mov(6) nop(5) | pad(5) at the loop head 0x4010c8 | mov edx,ecx(2) body(2)...
        #expect(copy.copyAddress(of: 0x4010c8) == copyPlacement + 28)
        #expect(copy.pieces.first { $0.copy.lowerBound == copyPlacement + 28 }?.kind == .pad)
        #expect(copy.copyAddress(of: 0x4010ca) == copyPlacement + 35)
        let rewritten = copy.pieces.filter { $0.kind == .rewritten }
        #expect(rewritten.map(\.original) == [0x4010ca, 0x4010d8])
        #expect(rewritten.map { $0.copy.count } == [2, 3], "each body emitted once, at its final address")
        // Both loops (inner wait, outer per character) go back through the loop-head pad.
        let backEdges = d.decodeAll(copy.bytes, address: copy.address).filter { $0.branch?.target == copyPlacement + 28 }
        #expect(backEdges.count == 2)
        #expect(copy.indirectJumps.isEmpty)
        // Fallback exits from inside a body are charged to the hot instruction.
        #expect(copy.originalAddress(of: copyPlacement + 36) == 0x4010ca)
    }

    @Test("stores back to back, the second rewritten: an exit at its body's first byte is the first store's (RIP past it), not the body's")
    func bodyStartIsThePreviousInstructionsExit() throws {
        let d = try X86Disassembler()
        // mov [rsi], eax; mov [rsi], r10d; ret
        let (image, symbol) = handMade([0x89, 0x06, 0x44, 0x89, 0x16, 0xc3])
        let f = try image.decode(symbol, disassembler: d)
        let copy = try FunctionCopy(f, at: copyPlacement, rewrites: [HotRewrite(address: 0x40_0002, bytes: [0x90, 0x90, 0x90])])
        let body = try #require(copy.pieces.first { $0.kind == .rewritten })
        #expect(body.original == 0x40_0002 && body.copy.lowerBound == copyPlacement + 2)
        // The first store, copied, exits with RIP past it: at the body's first byte, which maps to the original's
        // RIP past the first store, and is no exit of the body.
        #expect(copy.originalAddress(of: body.copy.lowerBound) == 0x40_0002)
        #expect(copy.bodyOriginal(holding: body.copy.lowerBound) == nil)
        // Inside the body (its fallback, its kick): the rewritten store's.
        #expect(copy.bodyOriginal(holding: body.copy.lowerBound + 1) == 0x40_0002)
        #expect(copy.bodyOriginal(holding: body.copy.upperBound - 1) == 0x40_0002)
        #expect(copy.bodyOriginal(holding: copyPlacement) == nil, "a copied instruction")
        #expect(copy.bodyOriginal(holding: body.copy.upperBound) == nil, "the ret after it")
    }

    @Test("near_limit: a je rel8 of +122 relaxes to rel32 and its span passes 127 after 15 jl rel8 grow")
    func nearLimit() throws {
        let d = try X86Disassembler()
        let f = try decodeFixture("near_limit", d)
        let je = f.instructions[2]
        #expect(je.mnemonic == "je" && je.length == 2 && je.branch?.offset == 0x7a)
        let copy = try FunctionCopy(f, at: copyPlacement)
        try expectRoundTrip(copy, d)
        let cje = try instruction(in: copy.bytes, base: copy.address, at: try #require(copy.copyAddress(of: je.address)), d)
        #expect(cje.mnemonic == "je" && cje.length == 6 && cje.branch?.offset ?? 0 > 127)
        #expect(cje.branch?.target == copy.copyAddress(of: f.end - 1), "the ret, at its new place")
        #expect(copy.bytes.count == Int(f.symbol.size) + 16 * 4)
    }

    @Test("count_loop: jrcxz and loop expanded, the loop head padded")
    func loopAndJrcxz() throws {
        let d = try X86Disassembler()
        let copy = try FunctionCopy(try decodeFixture("count_loop", d), at: copyPlacement)
        try expectRoundTrip(copy, d)
        #expect(copy.pieces.map(\.kind) == [.copied, .copied, .relocated, .pad, .copied, .relocated, .copied])
        #expect(copy.bytes.count == 2 + 2 + 9 + 5 + 2 + 9 + 1)
    }

    @Test("classify: the jump table stays an indirect jump to the original, the jcc to classify.cold goes to the original")
    func jumpTableAndCold() throws {
        let d = try X86Disassembler()
        let f = try decodeFixture("classify", d)
        let copy = try FunctionCopy(f, at: copyPlacement)
        try expectRoundTrip(copy, d)
        let cold = try fixtureSymbol("classify.cold")
        #expect(copy.indirectJumps == [0x40114f])
        let ja = try instruction(in: copy.bytes, base: copy.address, at: try #require(copy.copyAddress(of: 0x401149)), d)
        #expect(ja.mnemonic == "ja" && ja.branch?.target == cold.address)
        let jmp = try instruction(in: copy.bytes, base: copy.address, at: try #require(copy.copyAddress(of: 0x40114f)), d)
        #expect(jmp.bytes == [0xff, 0x24, 0xd5, 0x00, 0x20, 0x40, 0x00], "jmp [rdx*8+table] copied as is")
        // The tail call `jmp helper` (rel8) becomes a jmp rel32 to the original helper.
        let helper = try fixtureSymbol("helper")
        #expect(try instruction(in: copy.bytes, base: copy.address, at: try #require(copy.copyAddress(of: 0x401167)), d).branch?.target == helper.address)
        // classify.cold is a function of its own: it copies alone, and its jump back lands in the original.
        let coldCopy = try FunctionCopy(try fixtureImage.decode(cold, disassembler: d), at: copyPlacement + 0x800)
        try expectRoundTrip(coldCopy, d)
        #expect(d.decodeAll(coldCopy.bytes, address: coldCopy.address).compactMap(\.branch?.target).allSatisfy { !coldCopy.function.contains($0) })
    }

    @Test("calls: a pad after every call; eviction turns each into a jmp to the original's return address")
    func callsAndEviction() throws {
        let d = try X86Disassembler()
        let f = try decodeFixture("calls", d)
        let copy = try FunctionCopy(f, at: copyPlacement)
        try expectRoundTrip(copy, d)
        let calls = f.instructions.filter { $0.groups.contains(.call) }
        #expect(calls.count == 2)
        let pads = copy.pieces.filter { $0.kind == .pad }
        #expect(pads.map(\.original) == calls.map(\.nextAddress))
        let copied = d.decodeAll(copy.bytes, address: copy.address)
        for c in copied where c.groups.contains(.call) {
            #expect(pads.contains { $0.copy.lowerBound == c.nextAddress }, "the return address in the copy is a pad")
        }
        let evict = copy.evictionWrites
        #expect(evict.count == 2)
        for (w, p) in zip(evict, pads) {
            #expect(w.address == p.copy.lowerBound && w.original == CopyEncoding.nop5 && w.replacement.count == 5)
            let j = try d.decode(w.replacement, address: w.address)
            #expect(j.mnemonic == "jmp" && j.branch?.target == p.original)
        }
    }

    @Test("rip_data and cet_load: RIP-relative operands reach the same data from the copy")
    func ripRelative() throws {
        let d = try X86Disassembler()
        for name in ["rip_data", "cet_load", "cet_switch"] {
            let copy = try FunctionCopy(try decodeFixture(name, d), at: copyPlacement + 0x3_0000)
            try expectRoundTrip(copy, d)
            #expect(copy.pieces.contains { $0.kind == .relocated }, "\(name)")
        }
    }

    @Test("a function that can fall off its end gets a jmp to the original's end")
    func fallThroughExit() throws {
        let d = try X86Disassembler()
        let copy = try FunctionCopy(try decodeFixture("checked.cold", d), at: copyPlacement) // call fail (noreturn), nothing after
        try expectRoundTrip(copy, d)
        #expect(copy.pieces.map(\.kind) == [.relocated, .pad, .exit])
        #expect(copy.evictionWrites.count == 1)
    }
}

@testable import DMP
import Testing
import VMMKit
import X86Disassembler

/// Jump tables in function copies (``JumpTable``): a `switch` dispatch `jmp [index*8 + table]` stays in the copy.
@Suite("Jump tables in function copies")
struct JumpTableTests {
    /// `switch (edi) { case 0: return 1; case 1: return 2; case 2: return 3; default: return 0; }`, gcc's shape,
    /// at 0x400000, its table at 0x401000 (three entries, then a word that is no code address).
    static let code: [UInt8] = [
        0x83, 0xff, 0x02,                           // 0x00 cmp edi, 2
        0x77, 0x1b,                                 // 0x03 ja 0x20
        0x89, 0xf8,                                 // 0x05 mov eax, edi
        0xff, 0x24, 0xc5, 0x00, 0x10, 0x40, 0x00,   // 0x07 jmp qword ptr [rax*8 + 0x401000]
        0xb8, 0x01, 0x00, 0x00, 0x00, 0xc3,         // 0x0e mov eax, 1; ret
        0xb8, 0x02, 0x00, 0x00, 0x00, 0xc3,         // 0x14 mov eax, 2; ret
        0xb8, 0x03, 0x00, 0x00, 0x00, 0xc3,         // 0x1a mov eax, 3; ret
        0x31, 0xc0, 0xc3,                           // 0x20 xor eax, eax; ret
    ]
    static let entries: [UInt64] = [0x40_000e, 0x40_0014, 0x40_001a]
    static let table: [UInt8] = (entries + [0]).flatMap { e in (0..<8).map { UInt8(truncatingIfNeeded: e >> (8 * $0)) } }

    static func image() -> CodeImage {
        let s = GuestSymbol(name: "pick", address: 0x40_0000, size: UInt64(code.count), isFunction: true)
        return CodeImage(regions: [.init(address: 0x40_0000, bytes: code), .init(address: 0x40_1000, bytes: table)],
                         symbols: SymbolTable([s]))
    }

    static func function(_ d: X86Disassembler) throws -> DecodedFunction {
        let image = image()
        return try image.decode(try #require(image.function(containing: 0x40_0000)), disassembler: d)
    }

    /// The function and its tables as the planner finds them.
    static func withTables() throws -> (X86Disassembler, DecodedFunction, [JumpTable]) {
        let d = try X86Disassembler(mode: .bits64)
        let f = try function(d)
        return (d, f, JumpTable.find(in: f, image: image()))
    }

    @Test("the absolute dispatch is recognized in gcc's non-PIC form, notrack too; its entries are read while they are code addresses")
    func recognition() throws {
        let d = try X86Disassembler(mode: .bits64)
        func one(_ b: [UInt8]) throws -> X86Instruction { try d.decode(b, address: 0x40_0007) }
        let found = JumpTable.find(in: try JumpTableTests.function(d), image: JumpTableTests.image())
        #expect(found == [JumpTable(jump: 0x40_0007, table: 0x40_1000, index: .rax, entries: JumpTableTests.entries)])
        #expect(JumpTable.dispatch(try one([0x42, 0xff, 0x24, 0xcd, 0x00, 0x10, 0x40, 0x00]))?.index == .r9)
        #expect(JumpTable.dispatch(try one([0x3e, 0xff, 0x24, 0xc5, 0x00, 0x10, 0x40, 0x00]))?.index == .rax, "notrack")
        #expect(JumpTable.dispatch(try one([0x3e, 0x42, 0xff, 0x24, 0xcd, 0x00, 0x10, 0x40, 0x00]))?.index == .r9, "notrack and REX")
        #expect(JumpTable.dispatch(try one([0x2e, 0xff, 0x24, 0xc5, 0x00, 0x10, 0x40, 0x00])) == nil, "cs override")
        #expect(JumpTable.dispatch(try one([0xf2, 0xff, 0x24, 0xc5, 0x00, 0x10, 0x40, 0x00])) == nil, "bnd")
        #expect(JumpTable.dispatch(try one([0x3e, 0x3e, 0xff, 0x24, 0xc5, 0x00, 0x10, 0x40, 0x00])) == nil, "two prefixes")
        #expect(JumpTable.dispatch(try one([0xff, 0x24, 0x85, 0x00, 0x10, 0x40, 0x00])) == nil, "scale 4")
        #expect(JumpTable.dispatch(try one([0xff, 0x24, 0xc3])) == nil, "a base register")
        #expect(JumpTable.dispatch(try one([0xff, 0xe0])) == nil, "jmp rax")
    }

    @Test("the copy checks the index and the guest's entry, then jumps through a translated table; otherwise the original jmp")
    func dispatchInCopy() throws {
        let (d, f, tables) = try JumpTableTests.withTables()
        let copy = try FunctionCopy(f, at: 0x60_0000, jumpTables: tables)
        #expect(copy.jumpTables == tables)
        let piece = try #require(copy.pieces.first { $0.original == 0x40_0007 })
        #expect(piece.kind == .relocated)
        let bytes = Array(copy.bytes[Int(piece.copy.lowerBound - copy.address)..<Int(piece.copy.upperBound - copy.address)])
        let insns = d.decodeAll(bytes, address: piece.copy.lowerBound)
        #expect(insns.reduce(0) { $0 + $1.length } == bytes.count, "the dispatch decodes whole")
        let text = insns.map(\.description)
        let snapshot = try #require(insns.first { $0.mnemonic == "cmp" && $0.memoryOperands.count == 1 }?.memoryOperands.first?.memory)
        let translated = try #require(insns.first { $0.mnemonic == "jmp" }?.memoryOperands.first?.memory)
        let s = UInt64(snapshot.displacement), t = UInt64(translated.displacement)
        #expect(text == ["lea rsp, [rsp - 0x80]", "push rcx", "pushfq", "cmp rax, 3", "jae 0x\(String(insns[12].address, radix: 16))",
                         "mov rcx, qword ptr [rax*8 + 0x401000]", "cmp rcx, qword ptr [rax*8 + 0x\(String(s, radix: 16))]",
                         "jne 0x\(String(insns[12].address, radix: 16))", "popfq", "pop rcx", "lea rsp, [rsp + 0x80]",
                         "jmp qword ptr [rax*8 + 0x\(String(t, radix: 16))]",
                         // The miss path: the original jmp, which lands in the original.
                         "popfq", "pop rcx", "lea rsp, [rsp + 0x80]", "jmp qword ptr [rax*8 + 0x401000]"], "\(text)")
        func word(_ at: UInt64) -> UInt64 {
            let k = Int(at - copy.address)
            return copy.bytes[k..<k + 8].reversed().reduce(0) { $0 << 8 | UInt64($1) }
        }
        #expect(s % 8 == 0 && t == s + 24 && t + 24 == copy.end, "the tables follow the code")
        #expect((0..<3).map { word(s + UInt64($0) * 8) } == JumpTableTests.entries, "the snapshot")
        #expect((0..<3).map { word(t + UInt64($0) * 8) } == JumpTableTests.entries.map { copy.copyAddress(of: $0) ?? 0 })
        // Every case target has a pad in front of it (an evicted copy is left there).
        for e in JumpTableTests.entries {
            let p = try #require(copy.pieces.first { $0.original == e && $0.kind == .pad }, "a pad at \(e)")
            #expect(copy.copyAddress(of: e) == p.copy.lowerBound)
        }
    }

    @Test("a notrack dispatch (-fcf-protection) stays in the copy, its translated jump notrack too")
    func notrackDispatch() throws {
        let d = try X86Disassembler(mode: .bits64)
        var code = JumpTableTests.code
        code.insert(0x3e, at: 7) // notrack jmp qword ptr [rax*8 + 0x401000]; the cases move up by one
        code[4] += 1             // ja 0x21
        let entries = JumpTableTests.entries.map { $0 + 1 }
        let table = (entries + [0]).flatMap { e in (0..<8).map { UInt8(truncatingIfNeeded: e >> (8 * $0)) } }
        let s = GuestSymbol(name: "pick", address: 0x40_0000, size: UInt64(code.count), isFunction: true)
        let image = CodeImage(regions: [.init(address: 0x40_0000, bytes: code), .init(address: 0x40_1000, bytes: table)],
                              symbols: SymbolTable([s]))
        let f = try image.decode(s, disassembler: d)
        let tables = JumpTable.find(in: f, image: image)
        #expect(tables == [JumpTable(jump: 0x40_0007, table: 0x40_1000, index: .rax, entries: entries, notrack: true)])
        let copy = try FunctionCopy(f, at: 0x60_0000, jumpTables: tables)
        let piece = try #require(copy.pieces.first { $0.original == 0x40_0007 })
        let insns = d.decodeAll(Array(copy.bytes[Int(piece.copy.lowerBound - copy.address)..<Int(piece.copy.upperBound - copy.address)]),
                                address: piece.copy.lowerBound)
        let jumps = insns.filter { $0.mnemonic == "jmp" }
        #expect(jumps.count == 2 && jumps.allSatisfy { $0.bytes.first == 0x3e }, "both the translated and the original jump are notrack: \(jumps)")
        #expect(jumps.last?.bytes == Array(code[7..<15]), "the miss path is the original jmp")
    }

    /// cet_switch (copycet.c, gcc -O2 -fpie -fcf-protection=full): `lea rdx, [rip + table]; mov edi, edi;
    /// movsxd rax, dword ptr [rdx + rdi*4]; add rax, rdx; notrack jmp rax`, seven cases.
    static func cetSwitch() throws -> (X86Disassembler, DecodedFunction, CodeImage) {
        let d = try X86Disassembler(mode: .bits64)
        let image = CodeImage(
            regions: [.init(address: CopyFixtures.text.address, bytes: CopyFixtures.text.bytes),
                      .init(address: CopyFixtures.rodata.address, bytes: CopyFixtures.rodata.bytes)],
            symbols: fixtureImage.symbols)
        return (d, try image.decode(try fixtureSymbol("cet_switch"), disassembler: d), image)
    }

    @Test("gcc's PIC form (lea, movsxd, add, notrack jmp reg) is recognized; its entries are offsets from the table")
    func relativeRecognition() throws {
        let (_, f, image) = try JumpTableTests.cetSwitch()
        let tables = JumpTable.find(in: f, image: image)
        let t = try #require(tables.first)
        #expect(tables.count == 1)
        #expect(t.form == .relative && t.notrack && t.index == .rax && t.jump == f.start + 0x1d && t.table == 0x40_2044)
        #expect(t.entries.count == 7 && t.entries.allSatisfy { f.index(at: $0) != nil }, "\(t.entries)")
        #expect(t.targets(in: f) == Set(t.entries))
        // Only the straight run before the jmp counts: the same jmp with the add gone is no table.
        var bytes = f.bytes
        bytes.replaceSubrange(0x1a..<0x1d, with: [0x0f, 0x1f, 0x00]) // add rax, rdx -> nop
        let (plain, s) = handMade(bytes, at: f.start, name: "cet_switch")
        let g = try plain.decode(s, disassembler: try X86Disassembler(mode: .bits64))
        #expect(JumpTable.relativeDispatch(at: try #require(g.index(at: f.start + 0x1d)), in: g) == nil)
    }

    @Test("a relative dispatch in the copy compares the runtime target with each case and continues at the copy's point")
    func relativeDispatchInCopy() throws {
        let (d, f, image) = try JumpTableTests.cetSwitch()
        let tables = JumpTable.find(in: f, image: image)
        let copy = try FunctionCopy(f, at: copyPlacement, jumpTables: tables)
        #expect(copy.jumpTables == tables)
        let t = try #require(tables.first)
        let piece = try #require(copy.pieces.first { $0.original == t.jump })
        #expect(piece.kind == .relocated)
        let insns = d.decodeAll(Array(copy.bytes[Int(piece.copy.lowerBound - copy.address)..<Int(piece.copy.upperBound - copy.address)]),
                                address: piece.copy.lowerBound)
        #expect(insns.reduce(0) { $0 + $1.length } == piece.copy.count, "the dispatch decodes whole")
        let targets = Array(Set(t.entries)).sorted()
        let n = targets.count
        #expect(insns.prefix(2).map(\.description) == ["lea rsp, [rsp - 0x80]", "pushfq"])
        // Each compare names a case; its je goes to popfq, lea rsp, jmp to the copy's point for that case.
        var compared: [UInt64] = []
        for k in 0..<n {
            let cmp = insns[2 + 2 * k], je = insns[3 + 2 * k]
            #expect(cmp.mnemonic == "cmp" && je.mnemonic == "je", "\(cmp) \(je)")
            guard case .immediate(let v) = cmp.operands.last?.operand, let hit = je.branch?.target,
                  let h = insns.firstIndex(where: { $0.address == hit }) else { Issue.record("compare \(k)"); continue }
            compared.append(UInt64(bitPattern: v))
            #expect(insns[h...].prefix(3).map(\.mnemonic) == ["popfq", "lea", "jmp"])
            #expect(insns[h + 2].branch?.target == copy.copyAddress(of: UInt64(bitPattern: v)))
        }
        #expect(compared.sorted() == targets)
        // No match: the original notrack jmp rax, which lands in the original.
        let miss = Array(insns[2 + 2 * n..<2 + 2 * n + 3])
        #expect(miss.map(\.description) == ["popfq", "lea rsp, [rsp + 0x80]", "jmp rax"] && miss[2].bytes == [0x3e, 0xff, 0xe0], "\(miss)")
        for e in targets { #expect(copy.pieces.contains { $0.original == e && $0.kind == .pad }, "a pad at \(e)") }
        #expect(PatchPlanner.reachable(in: f, from: [f.start], jumpTables: tables).isSuperset(of: targets))
    }

    @Test("reachability follows a kept dispatch into the cases, and only then")
    func reachability() throws {
        let (_, f, tables) = try JumpTableTests.withTables()
        let with = PatchPlanner.reachable(in: f, from: [f.start], jumpTables: tables)
        let without = PatchPlanner.reachable(in: f, from: [f.start])
        #expect(with.isSuperset(of: JumpTableTests.entries))
        #expect(without.isDisjoint(with: JumpTableTests.entries))
    }

    @Test("a copy placed beyond a 32-bit displacement keeps the dispatch as it is")
    func farCopy() throws {
        let (_, f, tables) = try JumpTableTests.withTables()
        let copy = try FunctionCopy(f, at: 0x7fff_ff00_0000, jumpTables: tables)
        #expect(copy.jumpTables.isEmpty)
    }
}

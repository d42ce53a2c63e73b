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

    @Test("the dispatch is recognized in gcc's non-PIC form only; its entries are read while they are code addresses")
    func recognition() throws {
        let d = try X86Disassembler(mode: .bits64)
        func one(_ b: [UInt8]) throws -> X86Instruction { try d.decode(b, address: 0x40_0007) }
        let found = JumpTable.find(in: try JumpTableTests.function(d), image: JumpTableTests.image())
        #expect(found == [JumpTable(jump: 0x40_0007, table: 0x40_1000, index: .rax, entries: JumpTableTests.entries)])
        #expect(JumpTable.dispatch(try one([0x42, 0xff, 0x24, 0xcd, 0x00, 0x10, 0x40, 0x00]))?.index == .r9)
        #expect(JumpTable.dispatch(try one([0x3e, 0xff, 0x24, 0xc5, 0x00, 0x10, 0x40, 0x00])) == nil, "notrack")
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

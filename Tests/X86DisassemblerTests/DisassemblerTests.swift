import Testing
import X86Disassembler

@Suite("X86Disassembler over Capstone")
struct DisassemblerTests {
    @Test("port I/O instructions decode with their length and implicit registers")
    func portIO() throws {
        let d = try X86Disassembler(mode: .bits64)
        let out = try #require(d.decode([0xee], address: 0x1000))
        #expect(out.mnemonic == "out" && out.length == 1 && out.operandText == "dx, al")
        #expect(out.registersRead.contains("dx") && out.registersRead.contains("al"))
        let inb = try #require(d.decode([0xec]))
        #expect(inb.mnemonic == "in" && inb.registersWritten.contains("al"))
        let outImm = try #require(d.decode([0xe6, 0xf4]))
        #expect(outImm.length == 2 && outImm.operands.contains { $0.operand == .immediate(0xf4) })
    }

    @Test("MMIO stores decode with base, displacement, size and access")
    func mmioStore() throws {
        let d = try X86Disassembler(mode: .bits64)
        // mov dword ptr [rsi + 0x40], eax
        let i = try #require(d.decode([0x89, 0x46, 0x40], address: 0x2000))
        #expect(i.mnemonic == "mov" && i.length == 3)
        let mem = try #require(i.operands.first)
        #expect(mem.operand == .memory(segment: nil, base: "rsi", index: nil, scale: 1, displacement: 0x40))
        #expect(mem.size == 4 && mem.access.contains(.write))
        // mov eax, dword ptr [rip + 0x100]: RIP-relative load
        let r = try #require(d.decode([0x8b, 0x05, 0x00, 0x01, 0x00, 0x00], address: 0x3000))
        #expect(r.length == 6)
        #expect(r.operands.last?.operand == .memory(segment: nil, base: "rip", index: nil, scale: 1, displacement: 0x100))
    }

    @Test("32- and 16-bit modes decode the same bytes differently")
    func modes() throws {
        // b8 imm: mov eax, imm32 in 32-bit mode; mov ax, imm16 in 16-bit mode.
        let bytes: [UInt8] = [0xb8, 0x34, 0x12, 0x78, 0x56]
        let i32 = try #require(try X86Disassembler(mode: .bits32).decode(bytes))
        let i16 = try #require(try X86Disassembler(mode: .bits16).decode(bytes))
        #expect(i32.length == 5 && i32.operandText.contains("eax"))
        #expect(i16.length == 3 && i16.operandText.contains("ax"))
    }

    @Test("candidates ending at an address: the exiting instruction is found behind RIP")
    func candidates() throws {
        let d = try X86Disassembler(mode: .bits64)
        // mov edx, 0x3f8 ; out dx, al   -- RIP after the out is 0x1006
        let bytes: [UInt8] = [0xba, 0xf8, 0x03, 0x00, 0x00, 0xee]
        let c = d.candidatesEnding(at: 0x1006, bytesBefore: bytes)
        #expect(c.contains { $0.mnemonic == "out" && $0.address == 0x1005 })
        #expect(c.allSatisfy { $0.address + UInt64($0.length) == 0x1006 })
        #expect(d.candidatesEnding(at: 2, bytesBefore: bytes).isEmpty, "no underflow below address 0")
    }

    @Test("invalid bytes decode to nil, not a crash")
    func invalid() throws {
        let d = try X86Disassembler(mode: .bits64)
        #expect(d.decode([]) == nil)
        #expect(d.decode([0x0f]) == nil, "a two-byte opcode cut after its escape byte")
        #expect(d.decode([0x89, 0x46]) == nil, "a store missing its displacement byte")
        #expect(d.decode([0x06]) == nil, "push es is invalid in 64-bit mode")
    }
}

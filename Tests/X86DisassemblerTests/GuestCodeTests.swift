import Testing
import VMMKit
@testable import X86Disassembler

/// A guest with 4-level page tables: PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000.
/// Code pages: VA 0x10000 → PA 0x9000, VA 0x11000 → PA 0x7000 (not contiguous, reversed),
/// VA 0x12000 not mapped; VA 0x13000 → PA 0xa000 supervisor-only; data VA 0x20000 → PA 0xb000.
struct PagedGuest {
    let memory: GuestMemory
    var sregs = SpecialRegisters()

    init() throws {
        memory = try GuestMemory(size: 1 << 20)
        try memory.write(0x2000 | 0x7 as UInt64, at: GuestAddress(0x1000))
        try memory.write(0x3000 | 0x7 as UInt64, at: GuestAddress(0x2000))
        try memory.write(0x4000 | 0x7 as UInt64, at: GuestAddress(0x3000))
        try memory.write(0x9000 | 0x7 as UInt64, at: GuestAddress(0x4000 + 0x10 * 8))
        try memory.write(0x7000 | 0x7 as UInt64, at: GuestAddress(0x4000 + 0x11 * 8))
        try memory.write(0xa000 | 0x3 as UInt64, at: GuestAddress(0x4000 + 0x13 * 8))
        try memory.write(0xb000 | 0x7 as UInt64, at: GuestAddress(0x4000 + 0x20 * 8))
        sregs.cr0 = 0x8000_0011
        sregs.cr3 = 0x1000
        sregs.cr4 = 1 << 5
        sregs.efer = 0x500
        sregs.cs = Segment(selector: 0x8, type: 0xb, l: true)
    }

    /// Writes code at a virtual address (through the same mapping, page by page).
    func write(_ bytes: [UInt8], at virtual: UInt64) throws {
        let c = try context()
        for (k, b) in bytes.enumerated() {
            try memory.write(b, at: c.translate(virtual + UInt64(k), access: []))
        }
    }

    func context() throws(X86DecodeError) -> X86CodeContext { try X86CodeContext(memory: memory, specialRegisters: sregs) }
}

@Suite("Decoding guest code through the page walk")
struct GuestCodeTests {
    // movabs rax, 0x1122334455667788 (10 bytes)
    let movabs: [UInt8] = [0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]

    @Test("an instruction straddling two pages mapped to non-contiguous physical pages decodes whole")
    func straddle() throws {
        let g = try PagedGuest()
        try g.write(movabs, at: 0x10ffc)
        #expect(try g.memory.readBytes(at: GuestAddress(0x9ffc), count: 4) == Array(movabs.prefix(4)))
        #expect(try g.memory.readBytes(at: GuestAddress(0x7000), count: 6) == Array(movabs.suffix(6)))
        let d = try X86Disassembler()
        let i = try d.decode(at: 0x10ffc, in: g.context())
        #expect(i.length == 10 && i.address == 0x10ffc && i.bytes == movabs)
        #expect(i.operands.last?.operand == .immediate(0x1122334455667788))
        // Candidates ending after it, read backwards across the same boundary.
        let c = d.candidatesEnding(at: 0x11006, in: try g.context())
        #expect(c.contains { $0.address == 0x10ffc && $0.length == 10 })
    }

    @Test("code running into an unmapped page: typed error, or a normal decode when it ends first")
    func unmappedNextPage() throws {
        let g = try PagedGuest()
        let d = try X86Disassembler()
        try g.write(movabs.prefix(6).map { $0 }, at: 0x11ffa)
        #expect(throws: X86DecodeError.codeEndsAt(virtual: 0x12000, available: 6,
                                                  .pageNotPresent(virtual: 0x12000, level: 1))) {
            try d.decode(at: 0x11ffa, in: g.context())
        }
        // nop; out dx, al ending exactly at the page end.
        try g.write([0x90, 0xee], at: 0x11ffe)
        let i = try d.decode(at: 0x11fff, in: g.context())
        #expect(i.mnemonic == "out" && i.length == 1)
        // The first byte unmapped.
        #expect(throws: X86DecodeError.fetch(virtual: 0x12000, .pageNotPresent(virtual: 0x12000, level: 1))) {
            try d.decode(at: 0x12000, in: g.context())
        }
        // Reading backwards from an address after an unmapped page gives no bytes, not an error.
        #expect(try g.context().readCode(before: 0x13000, count: 15).isEmpty)
        #expect(d.candidatesEnding(at: 0x13000, in: try g.context()).isEmpty)
    }

    @Test("a forward decode from a known start settles which decoding ends at RIP")
    func forwardDecode() throws {
        let g = try PagedGuest()
        let d = try X86Disassembler()
        // mov edx, 0x3f8 ; mov al, 0x41 ; out dx, al -- across the page boundary at 0x11000
        try g.write([0xba, 0xf8, 0x03, 0x00, 0x00, 0xb0, 0x41, 0xee], at: 0x10ffc)
        let c = try g.context()
        var r = Registers()
        r.rdx = 0x3f8
        let access = X86ExitAccess(.port(0x3f8), width: 1, direction: .write)
        let behind = d.candidatesEnding(at: 0x11004, in: c).filter { $0.reproduces(access, registers: r, context: c) }
        #expect(Set(behind.map(\.address)) == [0x11002, 0x11003], "`41 ee` and `ee` both read as out dx, al")
        let confirmed = d.instruction(endingAt: 0x11004, decodingFrom: 0x10ffc, in: c)
        #expect(confirmed?.address == 0x11003 && confirmed?.mnemonic == "out")
        #expect(d.instruction(endingAt: 0x11003, decodingFrom: 0x10ffc, in: c)?.mnemonic == "mov")
        #expect(d.instruction(endingAt: 0x11002, decodingFrom: 0x10ffc, in: c) == nil, "0x11002 is inside mov al, 0x41")
        #expect(d.instruction(endingAt: 0x11004, decodingFrom: 0x11004, in: c) == nil)
        #expect(d.instruction(endingAt: 0x12004, decodingFrom: 0x11ff0, in: c) == nil, "runs into the unmapped page")
    }

    @Test("user-mode fetches respect the user bit; compatibility mode is refused; paging off is identity")
    func modes() throws {
        var g = try PagedGuest()
        let d = try X86Disassembler()
        try g.write([0x90], at: 0x13000)
        #expect(try d.decode(at: 0x13000, in: g.context()).mnemonic == "nop")
        g.sregs.ss.dpl = 3
        g.sregs.cs.dpl = 3
        #expect(throws: X86DecodeError.fetch(virtual: 0x13000, .protectionViolation(virtual: 0x13000, access: [.execute, .user]))) {
            try d.decode(at: 0x13000, in: g.context())
        }
        g.sregs.cs.l = false
        g.sregs.cs.db = true
        #expect(throws: X86DecodeError.compatibilityMode) { try g.context() }
        // Protected mode without paging, 32-bit code segment with a base.
        var p = try PagedGuest()
        p.sregs.efer = 0
        p.sregs.cr0 = 0x11
        p.sregs.cs = Segment(selector: 0x8, type: 0xb, base: 0x100, db: true)
        try p.memory.write([0xb8, 0x44, 0x33, 0x22, 0x11], at: GuestAddress(0x1100 + 0x10))
        let c = try p.context()
        #expect(c.mode == .bits32 && c.linear(instructionPointer: 0x1010) == 0x1110)
        let i = try d.decode(at: 0x1010, in: c)
        #expect(i.length == 5 && i.operands.first?.operand == .register(.eax) && i.address == 0x1010)
        // Real mode: 16-bit.
        p.sregs.cr0 = 0x10
        #expect(try p.context().mode == .bits16)
    }
}

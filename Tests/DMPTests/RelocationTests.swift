@testable import DMP
import Testing
import X86Disassembler

/// Where the relocated instructions come from, and where they go.
private let site: UInt64 = 0x40_0000
private let copyAt: UInt64 = 0x20_0000

private func decoded(_ bytes: [UInt8], at address: UInt64 = site, mode: X86Mode = .bits64) throws -> X86Instruction {
    try X86Disassembler().decode(bytes, address: address, mode: mode)
}

private func relocated(_ i: X86Instruction, to origin: UInt64 = copyAt) throws -> [X86Instruction] {
    var a = X86Assembler(origin: origin)
    try a.relocate(i)
    let bytes = try a.finish()
    let out = try X86Disassembler().decodeAll(bytes, address: origin)
    #expect(out.map(\.length).reduce(0, +) == bytes.count, "\(out)")
    return out
}

/// The absolute address a RIP-relative operand names.
private func ripTarget(_ i: X86Instruction) -> UInt64? {
    guard let f = i.encoding.displacement, let d = f.signedValue(in: i.bytes), i.encoding.isRIPRelative else { return nil }
    return i.nextAddress &+ UInt64(bitPattern: d)
}

@Suite struct RelocationTests {
    @Test("RIP-relative operands keep their absolute target, from the exact displacement field", arguments: [
        [0x8b, 0x05, 0x00, 0x01, 0x00, 0x00],                         // mov eax, [rip+0x100]
        [0x66, 0x89, 0x05, 0xf0, 0xff, 0xff, 0xff],                   // mov [rip-0x10], ax (Capstone says disp 2 bytes)
        [0xc7, 0x05, 0x10, 0x00, 0x00, 0x00, 0x78, 0x56, 0x34, 0x12], // mov dword [rip+0x10], 0x12345678 (imm after disp)
        [0x80, 0x3d, 0x00, 0x20, 0x00, 0x00, 0x05],                   // cmp byte [rip+0x2000], 5
        [0x48, 0x8d, 0x3d, 0x00, 0x00, 0x10, 0x00],                   // lea rdi, [rip+0x100000]
        [0xff, 0x25, 0x08, 0x00, 0x00, 0x00],                         // jmp [rip+8]
        [0xf0, 0x48, 0x0f, 0xb1, 0x15, 0x40, 0x00, 0x00, 0x00],       // lock cmpxchg [rip+0x40], rdx
    ] as [[UInt8]])
    func ripRelative(bytes: [UInt8]) throws {
        let i = try decoded(bytes)
        let out = try relocated(i)
        #expect(out.count == 1 && out[0].length == i.length && out[0].mnemonic == i.mnemonic)
        #expect(ripTarget(out[0]) == ripTarget(i) && ripTarget(i) != nil)
        // Everything but the displacement is copied.
        if let f = i.encoding.displacement {
            #expect(Array(out[0].bytes[..<f.offset]) == Array(i.bytes[..<f.offset]))
            #expect(Array(out[0].bytes[f.range.upperBound...]) == Array(i.bytes[f.range.upperBound...]))
        }
    }

    @Test("jmp and jcc rel8 are relaxed to rel32, rel32 forms and call rel32 keep their target", arguments: [
        ([0xeb, 0x10], "jmp"), ([0xe9, 0x00, 0x10, 0x00, 0x00], "jmp"), ([0x74, 0xfe], "je"), ([0x7f, 0x40], "jg"),
        ([0x0f, 0x85, 0x00, 0x00, 0x01, 0x00], "jne"), ([0xe8, 0x00, 0xf0, 0xff, 0xff], "call"),
        ([0x3e, 0x74, 0x10], "je"), ([0x48, 0xe9, 0x00, 0x10, 0x00, 0x00], "jmp"),
    ] as [([UInt8], String)])
    func branches(bytes: [UInt8], mnemonic: String) throws {
        let i = try decoded(bytes)
        let out = try relocated(i)
        #expect(out.count == 1 && out[0].mnemonic == mnemonic)
        #expect(out[0].branch?.target == i.branch?.target && i.branch != nil)
        #expect(out[0].branch?.field.size == 4)
        #expect(out[0].length == (mnemonic.hasPrefix("j") && mnemonic != "jmp" ? 6 : 5))
    }

    @Test("jrcxz, jecxz and the loops keep their short form over a ladder to a jmp rel32", arguments: [
        ([0xe3, 0x10], "jrcxz"), ([0x67, 0xe3, 0x10], "jecxz"), ([0xe2, 0xf0], "loop"),
        ([0xe1, 0x20], "loope"), ([0xe0, 0x20], "loopne"), ([0x67, 0xe2, 0xf0], "loop"),
    ] as [([UInt8], String)])
    func loops(bytes: [UInt8], mnemonic: String) throws {
        let i = try decoded(bytes)
        let out = try relocated(i)
        #expect(out.map(\.mnemonic) == [mnemonic, "jmp", "jmp"])
        guard out.count == 3 else { return }
        #expect(Array(out[0].bytes.dropLast()) == Array(bytes.dropLast()), "same prefixes and opcode (67 still selects ecx)")
        #expect(out[0].branch?.target == out[2].address, "taken: to the jmp rel32")
        #expect(out[1].branch?.target == out[2].nextAddress && out[1].length == 2, "not taken: over it")
        #expect(out[2].branch?.target == i.branch?.target && out[2].length == 5)
        #expect(out.allSatisfy { $0.flagsWritten.isEmpty }, "the ladder changes no flag")
    }

    @Test("a branch can be sent to a label instead of its decoded target (a function copy's own code)")
    func branchToLabel() throws {
        var a = X86Assembler(origin: copyAt)
        let l = a.newLabel()
        try a.relocate(try decoded([0x75, 0x02]), branchTarget: .label(l))
        try a.relocate(try decoded([0xe2, 0x02]), branchTarget: .label(l))
        try a.bind(l)
        let out = try X86Disassembler().decodeAll(try a.finish(), address: copyAt)
        #expect(out.count == 4)
        #expect(out[0].branch?.target == a.address(of: l) && out[3].branch?.target == a.address(of: l))
    }

    @Test("instructions without relative operands are copied byte for byte")
    func plainCopy() throws {
        for bytes: [UInt8] in [[0xee], [0x8b, 0x46, 0x08], [0x48, 0x89, 0x04, 0x24], [0xc3], [0x0f, 0x1f, 0x44, 0x00, 0x00], [0xff, 0xe0]] {
            var a = X86Assembler(origin: copyAt)
            try a.relocate(try decoded(bytes))
            #expect(try a.finish() == bytes)
        }
    }

    @Test("66- and bnd-prefixed branches, xbegin, non-64-bit code and far targets are refused", arguments: [
        ([0x66, 0xeb, 0x10], X86Mode.bits64, copyAt),
        ([0x66, 0x74, 0x10], .bits64, copyAt),
        ([0xf2, 0xe9, 0x00, 0x00, 0x00, 0x00], .bits64, copyAt),
        ([0xf2, 0x75, 0x10], .bits64, copyAt),
        ([0xc7, 0xf8, 0x10, 0x00, 0x00, 0x00], .bits64, copyAt),
        ([0xeb, 0x10], .bits32, copyAt),
        ([0xe9, 0x00, 0x00, 0x00, 0x00], .bits64, UInt64(0x1_0000_0000)),
        ([0x8b, 0x05, 0x00, 0x01, 0x00, 0x00], .bits64, UInt64(0x1_0000_0000)),
        ([0xe3, 0x10], .bits64, UInt64(0xffff_8000_0000_0000)),
    ] as [([UInt8], X86Mode, UInt64)])
    func refused(bytes: [UInt8], mode: X86Mode, origin: UInt64) throws {
        let i = try decoded(bytes, mode: mode)
        var a = X86Assembler(origin: origin)
        #expect(throws: DMPRefusal.self) { try a.relocate(i) }
        do { try a.relocate(i) } catch { #expect(error.stage == .encode && !error.reason.isEmpty) }
        #expect(a.bytes.isEmpty, "a refused instruction leaves nothing behind")
    }
}

import Testing
import VMMKit
@testable import X86Disassembler

@Suite("X86Disassembler over Capstone")
struct DisassemblerTests {
    @Test("port I/O instructions decode with their length, typed registers and port")
    func portIO() throws {
        let d = try X86Disassembler(mode: .bits64)
        let out = try d.decode([0xee], address: 0x1000)
        #expect(out.mnemonic == "out" && out.length == 1 && out.operandText == "dx, al")
        #expect(out.registersRead.contains(.dx) && out.registersRead.contains(.al))
        #expect(out.groups.contains(.portIO) && out.ioDirection == .write && out.ioWidth == 1)
        let inb = try d.decode([0xec])
        #expect(inb.mnemonic == "in" && inb.registersWritten.contains(.al) && inb.ioDirection == .read)
        let outImm = try d.decode([0xe6, 0xf4])
        #expect(outImm.length == 2 && outImm.operands.contains { $0.operand == .immediate(0xf4) })
        #expect(outImm.ioPort(registers: Registers()) == 0xf4)
        var r = Registers()
        r.rdx = 0xdead_03f8
        #expect(out.ioPort(registers: r) == 0x3f8)
        let inw = try d.decode([0x66, 0xed])
        #expect(inw.ioWidth == 2 && inw.ioPort(registers: r) == 0x3f8)
        #expect(try d.decode([0xed]).ioWidth == 4)
    }

    @Test("MMIO stores decode with base, displacement, size, access and field offsets")
    func mmioStore() throws {
        let d = try X86Disassembler(mode: .bits64)
        // mov dword ptr [rsi + 0x40], eax
        let i = try d.decode([0x89, 0x46, 0x40], address: 0x2000)
        #expect(i.mnemonic == "mov" && i.length == 3)
        let mem = try #require(i.operands.first)
        #expect(mem.operand == .memory(X86MemoryOperand(base: .rsi, displacement: 0x40)))
        #expect(mem.size == 4 && mem.access == .write)
        #expect(i.encoding.modRMOffset == 1 && i.encoding.displacement == X86Field(offset: 2, size: 1))
        #expect(i.groups.contains(.memoryAccess) && !i.groups.contains(.locked))
        // mov eax, dword ptr [rip + 0x100]: RIP-relative load
        let r = try d.decode([0x8b, 0x05, 0x00, 0x01, 0x00, 0x00], address: 0x3000)
        #expect(r.length == 6 && r.encoding.isRIPRelative)
        #expect(r.operands.last?.operand == .memory(X86MemoryOperand(base: .rip, displacement: 0x100)))
        #expect(r.encoding.displacement == X86Field(offset: 2, size: 4))
    }

    @Test("32- and 16-bit modes decode the same bytes differently")
    func modes() throws {
        // b8 imm: mov eax, imm32 in 32-bit mode; mov ax, imm16 in 16-bit mode.
        let bytes: [UInt8] = [0xb8, 0x34, 0x12, 0x78, 0x56]
        let i32 = try X86Disassembler(mode: .bits32).decode(bytes)
        let i16 = try X86Disassembler(mode: .bits16).decode(bytes)
        #expect(i32.length == 5 && i32.operands.first?.operand == .register(.eax))
        #expect(i16.length == 3 && i16.operands.first?.operand == .register(.ax))
        // One disassembler decodes in any mode on request.
        let d = try X86Disassembler(mode: .bits64)
        #expect(try d.decode(bytes, mode: .bits16).length == 3)
        #expect(try d.decode([0x40], mode: .bits32).mnemonic == "inc")
        #expect(throws: X86DecodeError.truncated(available: 1, needed: 2)) { try d.decode([0x40]) }
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

    @Test("invalid bytes give typed errors, not a crash")
    func invalid() throws {
        let d = try X86Disassembler(mode: .bits64)
        #expect(throws: X86DecodeError.empty) { try d.decode([]) }
        #expect(throws: X86DecodeError.truncated(available: 1, needed: 2)) { try d.decode([0x0f]) }
        #expect(throws: X86DecodeError.truncated(available: 2, needed: 3)) { try d.decode([0x89, 0x46]) }
        #expect(throws: X86DecodeError.invalid) { try d.decode([0x06]) }
        #expect(throws: X86DecodeError.tooLong) { try d.decode([UInt8](repeating: 0x66, count: 14) + [0x89, 0x46, 0x40]) }
        #expect(d.decodeAll([0x90, 0x90, 0x06, 0x90]).count == 2, "decodeAll stops at the first invalid instruction")
    }

    @Test("registers: widths, architectural register, values from Registers")
    func registers() {
        var r = Registers()
        r.rax = 0x1122_3344_5566_7788
        r.r8 = 0xaabb_ccdd_eeff_0011
        r.rip = 0x4000
        #expect(X86Register.al.architectural == .rax && X86Register.ah.architectural == .rax)
        #expect(X86Register.r8d.architectural == .r8 && X86Register.r8b.architectural == .r8)
        #expect(X86Register.eip.architectural == .rip && X86Register.xmm(3).architectural == .zmm(3))
        #expect(X86Register.al.value(in: r) == 0x88 && X86Register.ah.value(in: r) == 0x77)
        #expect(X86Register.ax.value(in: r) == 0x7788 && X86Register.eax.value(in: r) == 0x5566_7788)
        #expect(X86Register.r8d.value(in: r) == 0xeeff_0011 && X86Register.r8w.value(in: r) == 0x0011)
        #expect(X86Register.rip.value(in: r) == 0x4000 && X86Register.xmm(0).value(in: r) == nil)
        #expect(X86Register.eax.width == 4 && X86Register.ah.width == 1 && X86Register.xmm(1).width == 16)
        #expect(X86Register.r13w.description == "r13w" && X86Register.st(2).description == "st(2)")
        #expect(X86Register.gpr64.count == 16 && X86Register.gpr8[4] == .spl)
    }

    @Test("groups and EFLAGS from the opcode and Capstone's flag detail")
    func groupsAndFlags() throws {
        let d = try X86Disassembler(mode: .bits64)
        let jz = try d.decode([0x74, 0x10], address: 0x1000)
        #expect(jz.groups.isSuperset(of: [.jump, .conditionalBranch, .relativeBranch]))
        #expect(jz.branch == X86RelativeBranch(target: 0x1012, offset: 0x10, field: X86Field(offset: 1, size: 1)))
        #expect(jz.flagsRead == .zero && jz.flagsWritten.isEmpty)
        let call = try d.decode([0xe8, 0xfb, 0xff, 0xff, 0xff], address: 0x2000)
        #expect(call.groups.contains(.call) && call.branch?.target == 0x2000 && call.branch?.field == X86Field(offset: 1, size: 4))
        let loop = try d.decode([0xe2, 0xfe], address: 0x10)
        #expect(loop.groups.contains(.jump), "Capstone 4.0.2 gives loop no jump group")
        #expect(try d.decode([0xff, 0xe0]).groups.isSuperset(of: [.jump, .indirectBranch]))
        #expect(try d.decode([0xff, 0x15, 0, 0, 0, 0]).groups.isSuperset(of: [.call, .indirectBranch]))
        #expect(try d.decode([0xc3]).groups.contains(.return))
        #expect(try d.decode([0xcd, 0x80]).groups.contains(.interrupt))
        #expect(try d.decode([0x0f, 0x05]).groups.contains(.interrupt))
        #expect(try d.decode([0x48, 0xcf]).groups.contains(.interruptReturn))
        #expect(try d.decode([0xf4]).groups.isSuperset(of: [.halt, .privileged]))
        #expect(try d.decode([0x0f, 0x22, 0xd8]).groups.contains(.privileged))
        #expect(try d.decode([0x0f, 0x0b]).groups.contains(.undefined))
        #expect(try d.decode([0xc7, 0xf8, 0, 0, 0, 0]).groups.isSuperset(of: [.transactional, .relativeBranch]))
        let rep = try d.decode([0xf3, 0x6e])
        #expect(rep.groups.isSuperset(of: [.string, .repeated, .portIO]))
        let lock = try d.decode([0xf0, 0x01, 0x06])
        #expect(lock.groups.isSuperset(of: [.locked, .memoryAccess]))
        #expect(lock.flagsWritten == .arithmetic && lock.flagsRead.isEmpty)
        let adc = try d.decode([0x11, 0xc8])
        #expect(adc.flagsRead.contains(.carry) && adc.flagsWritten.isSuperset(of: .arithmetic))
        #expect(!(try d.decode([0x8d, 0x04, 0x40])).groups.contains(.memoryAccess), "lea accesses no memory")
        #expect(try d.decode([0xfa]).flagsWritten == .interrupt)
        #expect(try d.decode([0x62, 0xf1, 0x7c, 0x48, 0x10, 0x40, 0x01]).groups.contains(.vectorEncoded))
    }

    @Test("prefixes, REX and opcode maps come from the encoding tables")
    func prefixes() throws {
        let d = try X86Disassembler(mode: .bits64)
        // lock; fs; 66; REX.W... : f0 64 66 41 0f b1 0e  = lock cmpxchg word ptr fs:[r14], cx
        let i = try d.decode([0xf0, 0x64, 0x66, 0x41, 0x0f, 0xb1, 0x0e])
        #expect(i.encoding.legacyPrefixes == [0xf0, 0x64, 0x66] && i.encoding.rex == 0x41)
        #expect(i.encoding.hasLock && i.encoding.segmentOverride == 0x64 && i.encoding.operandSize == 16)
        #expect(i.encoding.map == .map0F && i.encoding.opcode == 0xb1 && i.encoding.opcodeOffset == 5)
        #expect(i.memoryOperands.first?.memory == X86MemoryOperand(segment: .fs, base: .r14))
        // A REX before a legacy prefix is ignored.
        let j = try d.decode([0x48, 0x66, 0x89, 0x06])
        #expect(j.encoding.rex == nil && j.encoding.operandSize == 16 && j.operands.first?.size == 2)
        // SIB without base: disp32 follows the SIB byte.
        let k = try d.decode([0x8b, 0x04, 0xdd, 0x00, 0x10, 0x00, 0x00])
        #expect(k.encoding.sibOffset == 2 && k.encoding.displacement == X86Field(offset: 3, size: 4))
        // SSE4a insertq (register form, two imm8) vs F2 0F 78 with memory (read as vmread).
        #expect(try X86Encoding.decode([0xf2, 0x0f, 0x78, 0xc1, 0x04, 0x08], mode: .bits64).length == 6)
        #expect(try X86Encoding.decode([0xf2, 0x0f, 0x78, 0x35, 0, 0, 0, 0], mode: .bits64).length == 8)
        // mov to/from CR/DR ignore the mod bits: no SIB, no displacement.
        #expect(try d.decode([0x0f, 0x20, 0x05, 0x90]).length == 3)
        #expect(try d.decode([0x0f, 0x22, 0x44, 0x90]).encoding.displacement == nil)
        // VEX3 with an imm8.
        let v = try d.decode([0xc4, 0xe3, 0xfd, 0x01, 0x05, 0, 0, 0, 0, 0x01])
        #expect(v.encoding.vectorPrefix == X86Field(offset: 0, size: 3) && v.encoding.map == .vex(3) && v.encoding.vexW)
        #expect(v.encoding.displacement == X86Field(offset: 5, size: 4) && v.encoding.immediate == X86Field(offset: 9, size: 1))
    }
}

@Suite("Capstone 4.0.2 mistakes, each handled")
struct CapstoneMistakeTests {
    @Test("1: 66-prefixed near branches in 64-bit mode are refused (vendor-dependent length)")
    func operandSizeBranches() throws {
        let d = try X86Disassembler(mode: .bits64)
        #expect(throws: X86DecodeError.vendorDependentBranch) { try d.decode([0x66, 0xe8, 0, 0, 0, 0]) }
        #expect(throws: X86DecodeError.vendorDependentBranch) { try d.decode([0x66, 0xe9, 0, 0, 0, 0]) }
        #expect(throws: X86DecodeError.vendorDependentBranch) { try d.decode([0x66, 0x0f, 0x84, 0, 0, 0, 0]) }
        // Our tables read Intel's rel32; Capstone reads rel16 (4 bytes).
        #expect(try X86Encoding.decode([0x66, 0xe8, 0, 0, 0, 0], mode: .bits64).length == 6)
        // Outside 64-bit mode the prefix selects the offset size unambiguously.
        #expect(try d.decode([0x66, 0xe8, 0, 0, 0, 0], mode: .bits16).length == 6)
        #expect(try d.decode([0x66, 0xe8, 0, 0], mode: .bits32).length == 4)
    }

    @Test("2: with 66 (or VEX.pp=66) a disp32 is reported as 2 bytes and an imm8 as 2: fields come from our tables")
    func operandSizeFields() throws {
        let d = try X86Disassembler(mode: .bits64)
        // mov word ptr [rip + 0x1000], ax
        let a = try d.decode([0x66, 0x89, 0x05, 0x00, 0x10, 0x00, 0x00])
        #expect(a.capstoneDisplacement == X86Field(offset: 3, size: 2), "the mistake is still there")
        #expect(a.encoding.displacement == X86Field(offset: 3, size: 4))
        // vmovupd xmm0, [rip]: VEX.pp = 66
        let v = try d.decode([0xc5, 0xf9, 0x10, 0x05, 0, 0, 0, 0])
        #expect(v.capstoneDisplacement?.size == 2 && v.encoding.displacement == X86Field(offset: 4, size: 4))
        // in ax, 0xff
        let i = try d.decode([0x66, 0xe5, 0xff])
        #expect(i.capstoneImmediate == X86Field(offset: 2, size: 2) && i.encoding.immediate == X86Field(offset: 2, size: 1))
        // With REX.W the sizes are right: the bug is tied to a 16-bit operand size.
        let w = try d.decode([0x66, 0x48, 0x0f, 0x6e, 0x05, 0, 0, 0, 0])
        #expect(w.capstoneDisplacement == w.encoding.displacement)
    }

    @Test("6: EFLAGS reads Capstone misses are added")
    func flagsRead() throws {
        let d = try X86Disassembler(mode: .bits64)
        #expect(try d.decode([0x19, 0xc8]).flagsRead == .carry, "sbb eax, ecx")
        #expect(try d.decode([0x83, 0xd0, 0x01]).flagsRead == .carry, "adc eax, 1")
        #expect(try d.decode([0xd1, 0xd0]).flagsRead == .carry, "rcl eax, 1")
        #expect(try d.decode([0xf5]).flagsRead == .carry, "cmc")
        #expect(try d.decode([0x66, 0x0f, 0x38, 0xf6, 0xc1]).flagsRead == .carry, "adcx")
        #expect(try d.decode([0xf3, 0x0f, 0x38, 0xf6, 0xc1]).flagsRead == .overflow, "adox")
        #expect(try d.decode([0x9c]).flagsRead.isSuperset(of: [.arithmetic, .direction, .interrupt]), "pushf")
        #expect(try d.decode([0x9f]).flagsRead == [.sign, .zero, .auxiliaryCarry, .parity, .carry], "lahf")
        #expect(try d.decode([0xd3, 0xe0]).flagsRead.isSuperset(of: .arithmetic), "shl eax, cl may keep the flags")
        #expect(try d.decode([0xc1, 0xe0, 0x03]).flagsRead.isEmpty, "shl eax, 3 does not")
        #expect(try d.decode([0x01, 0xc8]).flagsRead.isEmpty, "add reads none")
    }

    @Test("7: immediate sizes come from the tables (in imm8, rorx, far pointers)")
    func immediateSizes() throws {
        let d = try X86Disassembler(mode: .bits64)
        let inb = try d.decode([0xe5, 0x60])
        #expect(inb.capstoneImmediate == X86Field(offset: 1, size: 4) && inb.encoding.immediate == X86Field(offset: 1, size: 1))
        let rorx = try d.decode([0xc4, 0xe3, 0x7b, 0xf0, 0x05, 0x00, 0x01, 0x00, 0x00, 0x03])
        #expect(rorx.capstoneImmediate?.size == 4 && rorx.encoding.immediate == X86Field(offset: 9, size: 1))
        let far = try d.decode([0xea, 0x44, 0x33, 0x22, 0x11, 0x10, 0x00], mode: .bits32)
        #expect(far.encoding.immediate == X86Field(offset: 1, size: 4) && far.encoding.secondImmediate == X86Field(offset: 5, size: 2))
    }

    @Test("8: ud0/ud1 are refused by the length check")
    func undefinedOpcodes() throws {
        let d = try X86Disassembler(mode: .bits64)
        #expect(throws: X86DecodeError.lengthDisagreement(capstone: 2, tables: 3)) { try d.decode([0x0f, 0xb9, 0x06]) }
        #expect(try d.decode([0x0f, 0x0b]).groups.contains(.undefined), "ud2 decodes")
    }

    @Test("11: 67 with REX.W on a near call is refused by the length check")
    func addressSizeCall() throws {
        let d = try X86Disassembler(mode: .bits64)
        #expect(throws: X86DecodeError.lengthDisagreement(capstone: 5, tables: 7)) { try d.decode([0x67, 0x48, 0xe8, 0, 0, 0, 0]) }
        #expect(try d.decode([0x67, 0xe8, 0, 0, 0, 0]).length == 6, "without REX.W Capstone agrees")
    }

    @Test("10: implicit registers Capstone leaves out are added")
    func implicitRegisters() throws {
        let d = try X86Disassembler(mode: .bits64)
        let cmpxchg = try d.decode([0x0f, 0xb1, 0x0e])
        #expect(cmpxchg.registersWritten.contains(.eax) && cmpxchg.registersRead.contains(.eax))
        #expect(try d.decode([0x48, 0x0f, 0xb1, 0x0e]).registersWritten.contains(.rax))
        #expect(Set(try d.decode([0x0f, 0x05]).registersWritten).isSuperset(of: [.rcx, .r11]), "syscall")
        let xlat = try d.decode([0xd7])
        #expect(xlat.registersRead.contains(.rbx) && xlat.registersRead.contains(.al) && xlat.registersWritten == [.al])
        let enter = try d.decode([0xc8, 0x10, 0x00, 0x00])
        #expect(Set(enter.registersWritten) == [.rsp, .rbp] && Set(enter.registersRead) == [.rsp, .rbp])
        // Capstone's own lists are kept: rep movsb reads and writes RCX, RSI, RDI.
        let movs = try d.decode([0xf3, 0xa4])
        #expect(Set(movs.registersWritten).isSuperset(of: [.rcx, .rsi, .rdi]) && movs.registersRead.contains(.eflags))
    }

    @Test("3: enter's two immediates")
    func enter() throws {
        let i = try X86Disassembler(mode: .bits64).decode([0xc8, 0x10, 0x00, 0x01])
        #expect(i.capstoneImmediate == X86Field(offset: 3, size: 1))
        #expect(i.encoding.immediate == X86Field(offset: 1, size: 2) && i.encoding.secondImmediate == X86Field(offset: 3, size: 1))
    }

    @Test("4: memory operand access corrected where Capstone reports it wrong")
    func access() throws {
        let d = try X86Disassembler(mode: .bits64)
        func access(_ b: [UInt8]) throws -> OperandAccess? { try d.decode(b).memoryOperands.first?.access }
        #expect(try access([0x0f, 0x11, 0x06]) == .write, "movups [rsi], xmm0")
        #expect(try access([0x66, 0x0f, 0xd6, 0x06]) == .write, "movq [rsi], xmm0")
        #expect(try access([0xf3, 0x0f, 0x7e, 0x06]) == .read, "movq xmm0, [rsi]")
        #expect(try access([0x66, 0x0f, 0x7e, 0x06]) == .write, "movd [rsi], xmm0")
        #expect(try access([0xc5, 0xfa, 0x11, 0x06]) == .write, "vmovss [rsi], xmm0")
        #expect(try access([0x0f, 0xc3, 0x06]) == .write, "movnti")
        #expect(try access([0xd9, 0x1e]) == .write, "fstp dword ptr [rsi]")
        #expect(try access([0xd9, 0x06]) == .read, "fld dword ptr [rsi]")
        #expect(try access([0x0f, 0xae, 0x1e]) == .write, "stmxcsr")
        #expect(try access([0x0f, 0xae, 0x16]) == .read, "ldmxcsr")
        #expect(try access([0xf0, 0x48, 0x0f, 0xb1, 0x0e]) == [.read, .write], "lock cmpxchg")
        #expect(try access([0x48, 0x0f, 0xc7, 0x0e]) == [.read, .write], "cmpxchg16b")
        #expect(try access([0xf6, 0x06, 0x0a]) == .read, "test byte ptr [rsi], 10")
        // Only `test` (/0, /1) of F6/F7 is corrected; not, neg, mul, div keep Capstone's answer.
        #expect(try access([0xf6, 0x16]) == [.read, .write], "not byte ptr [rsi]")
        #expect(try access([0xf6, 0x1e]) == [.read, .write], "neg byte ptr [rsi]")
        #expect(try access([0xf7, 0x16]) == [.read, .write], "not dword ptr [rsi]")
        #expect(try access([0x6c]) == .write, "insb")
        #expect(try access([0x6e]) == .read, "outsb")
        #expect(try access([0x66, 0x0f, 0x3a, 0x16, 0x06, 0x01]) == .write, "pextrd [rsi], xmm0, 1")
        #expect(try access([0x01, 0x06]) == [.read, .write], "add [rsi], eax keeps Capstone's (right) answer")
    }

    @Test("12: stores Capstone reports as reads, and save areas it sizes wrongly")
    func moreStores() throws {
        let d = try X86Disassembler(mode: .bits64)
        func operand(_ b: [UInt8]) throws -> DecodedOperand? { try d.decode(b).memoryOperands.first }
        let stores: [([UInt8], String)] = [
            ([0x0f, 0x90, 0x06], "seto byte ptr [rsi]"), ([0x0f, 0x97, 0x06], "seta byte ptr [rsi]"),
            ([0x0f, 0x9f, 0x06], "setg byte ptr [rsi]"), ([0x0f, 0x94, 0x06], "sete byte ptr [rsi]"),
            ([0x0f, 0x38, 0xf1, 0x06], "movbe dword ptr [rsi], eax"),
            ([0xc4, 0xe3, 0x7d, 0x19, 0x0e, 0x01], "vextractf128 [rsi], ymm1, 1"),
            ([0xc4, 0xe3, 0x7d, 0x39, 0x0e, 0x01], "vextracti128 [rsi], ymm1, 1"),
            ([0xc4, 0xe2, 0x75, 0x2e, 0x16], "vmaskmovps [rsi], ymm1, ymm2"),
            ([0xc4, 0xe2, 0x75, 0x2f, 0x16], "vmaskmovpd [rsi], ymm1, ymm2"),
            ([0xc4, 0xe2, 0x75, 0x8e, 0x16], "vpmaskmovd [rsi], ymm1, ymm2"),
            ([0xc5, 0xf8, 0x91, 0x0e], "kmovw word ptr [rsi], k1"),
            ([0x62, 0xf2, 0x7e, 0x48, 0x35, 0x0e], "vpmovqd ymmword ptr [rsi], zmm1"),
            ([0x62, 0xf2, 0x7d, 0x49, 0xa0, 0x0c, 0x96], "vpscatterdd [rsi + zmm2*4]{k1}, zmm1"),
        ]
        for (bytes, text) in stores { #expect(try operand(bytes)?.access == .write, "\(text)") }
        let reads: [([UInt8], String)] = [
            ([0x0f, 0x38, 0xf0, 0x06], "movbe eax, dword ptr [rsi]"), ([0xf2, 0x0f, 0x38, 0xf1, 0x06], "crc32 eax, dword ptr [rsi]"),
            ([0xc4, 0xe2, 0x6d, 0x2c, 0x0e], "vmaskmovps ymm1, ymm2, [rsi]"),
            ([0xc4, 0xe3, 0x6d, 0x38, 0x0e, 0x01], "vinserti128 ymm1, ymm2, [rsi], 1"),
        ]
        for (bytes, text) in reads { #expect(try operand(bytes)?.access == .read, "\(text)") }
        // Save areas: fxsave 512 bytes, fnsave 108, the XSAVE family 0 (XCR0 sizes it).
        let fxsave = try #require(try operand([0x0f, 0xae, 0x06]))
        #expect(fxsave.access == .write && fxsave.size == 512, "fxsave [rsi]")
        #expect(try operand([0x0f, 0xae, 0x0e])?.size == 512, "fxrstor [rsi]")
        let fnsave = try #require(try operand([0xdd, 0x36]))
        #expect(fnsave.access == .write && fnsave.size == 108, "fnsave [rsi]")
        #expect(try operand([0x66, 0xdd, 0x36])?.size == 94, "fnsave with a 16-bit operand size")
        for (bytes, text) in [([0x0f, 0xae, 0x26], "xsave"), ([0x0f, 0xae, 0x36], "xsaveopt"), ([0x0f, 0xc7, 0x26], "xsavec"),
                              ([0x0f, 0xc7, 0x2e], "xsaves"), ([0x48, 0x0f, 0xae, 0x26], "xsave64")] as [([UInt8], String)] {
            let o = try #require(try operand(bytes), "\(text)")
            #expect(o.access == .write && o.size == 0, "\(text) [rsi]")
        }
        #expect(try operand([0x0f, 0xae, 0x1e])?.size == 4, "stmxcsr keeps its size")
    }
}

import Testing
import VMMKit
@testable import X86Disassembler

@Suite("Effective addresses of memory operands")
struct EffectiveAddressTests {
    func ea(_ bytes: [UInt8], mode: X86Mode = .bits64, at address: UInt64 = 0x1000, _ r: Registers,
            _ s: X86SegmentBases = X86SegmentBases()) throws -> UInt64? {
        let i = try X86Disassembler(mode: mode).decode(bytes, address: address)
        let m = try #require(i.memoryOperands.first?.memory)
        return i.effectiveAddress(of: m, registers: r, segments: s)
    }

    @Test("RIP-relative operands count from the next instruction, with or without an immediate after the displacement")
    func ripRelative() throws {
        let r = Registers()
        // mov eax, [rip + 0x100] (6 bytes) at 0x1000 -> 0x1106
        #expect(try ea([0x8b, 0x05, 0x00, 0x01, 0x00, 0x00], r) == 0x1106)
        // mov dword ptr [rip - 0x10], 0x11223344 (10 bytes)
        #expect(try ea([0xc7, 0x05, 0xf0, 0xff, 0xff, 0xff, 0x44, 0x33, 0x22, 0x11], r) == 0x100a - 0x10)
        // 66-prefixed: mov word ptr [rip + 0x1000], 0x1234 (9 bytes; Capstone's displacement size is wrong here)
        #expect(try ea([0x66, 0xc7, 0x05, 0x00, 0x10, 0x00, 0x00, 0x34, 0x12], r) == 0x1009 + 0x1000)
        // pshufd xmm0, [rip + 0x100], 0x1b (9 bytes)
        #expect(try ea([0x66, 0x0f, 0x70, 0x05, 0x00, 0x01, 0x00, 0x00, 0x1b], r) == 0x1009 + 0x100)
        // 67: mov eax, [eip + 0x100] wraps at 4 GiB
        #expect(try ea([0x67, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00], at: 0x1_ffff_fff0, r) == (0x1_ffff_fff7 + 0x100) & 0xffff_ffff)
    }

    @Test("base + index × scale + displacement; 32-bit address size truncates")
    func sib() throws {
        var r = Registers()
        r.rax = 0x1000; r.rbx = 3; r.r13 = 0x5000; r.r14 = 0x10
        // mov eax, [rax + rbx*4 + 0x11223344]
        #expect(try ea([0x8b, 0x84, 0x98, 0x44, 0x33, 0x22, 0x11], r) == 0x1000 + 12 + 0x11223344)
        // mov eax, [r13 + r14*2 + 0x10]
        #expect(try ea([0x43, 0x8b, 0x44, 0x75, 0x10], r) == 0x5000 + 0x20 + 0x10)
        // mov eax, [rbx*8 + 0x1000] (no base)
        #expect(try ea([0x8b, 0x04, 0xdd, 0x00, 0x10, 0x00, 0x00], r) == 24 + 0x1000)
        // negative displacement: mov byte ptr [rbp - 1], cl
        r.rbp = 0x8000
        #expect(try ea([0x88, 0x4d, 0xff], r) == 0x7fff)
        // 67 prefix: mov eax, [eax + 0x10] uses only EAX and wraps at 32 bits
        r.rax = 0xffff_ffff_ffff_fff8
        #expect(try ea([0x67, 0x8b, 0x40, 0x10], r) == 0x8)
        // moffs: movabs eax, [0x1122334455667788]
        #expect(try ea([0xa1, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11], r) == 0x1122334455667788)
    }

    @Test("segment bases: only fs/gs in 64-bit mode; all of them, with 32-bit wrap, outside it")
    func segments() throws {
        var r = Registers()
        r.rax = 0x10
        let bases = X86SegmentBases(es: 0x100, cs: 0x200, ss: 0x300, ds: 0x400, fs: 0x7000_0000_0000, gs: 0x8000)
        // mov eax, fs:[0x28]
        #expect(try ea([0x64, 0x8b, 0x04, 0x25, 0x28, 0, 0, 0], r, bases) == 0x7000_0000_0028)
        // mov rax, gs:[rax + 0x10]
        #expect(try ea([0x65, 0x48, 0x8b, 0x40, 0x10], r, bases) == 0x8020)
        // ds, es and ss overrides are ignored in 64-bit mode
        #expect(try ea([0x26, 0x8b, 0x40, 0x10], r, bases) == 0x20)
        #expect(try ea([0x8b, 0x40, 0x10], r, bases) == 0x20)
        // 32-bit mode: ds by default, ss for ebp-based, es override, wrap at 4 GiB
        r.rbp = 0x20
        #expect(try ea([0x8b, 0x40, 0x10], mode: .bits32, r, bases) == 0x420)
        #expect(try ea([0x8b, 0x45, 0x10], mode: .bits32, r, bases) == 0x330)
        #expect(try ea([0x26, 0x8b, 0x40, 0x10], mode: .bits32, r, bases) == 0x120)
        let high = X86SegmentBases(ds: 0xffff_ff00)
        #expect(try ea([0x8b, 0x80, 0x00, 0x01, 0x00, 0x00], mode: .bits32, r, high) == 0x10)
        // String destination uses es: stosb [edi]
        r.rdi = 0x40
        #expect(try ea([0xaa], mode: .bits32, r, bases) == 0x140)
        // 16-bit addressing: [bx + si + 0x10] wraps at 64 KiB
        r.rbx = 0xfff0; r.rsi = 0x8
        #expect(try ea([0x8b, 0x40, 0x10], mode: .bits16, r) == 0x8)
    }
}

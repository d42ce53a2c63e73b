import Testing
import VMMKit
@testable import X86Disassembler

@Suite("Matching an exit to the instruction that made it")
struct ExitMatchTests {
    let d: X86Disassembler
    init() throws { d = try X86Disassembler(mode: .bits64) }

    @Test("port I/O: port (imm8 or DX), width and direction must all match")
    func portIO() throws {
        var r = Registers()
        r.rdx = 0x3f8
        let outDX = try d.decode([0xee])
        #expect(outDX.reproduces(X86ExitAccess(.port(0x3f8), width: 1, direction: .write), registers: r))
        #expect(!outDX.reproduces(X86ExitAccess(.port(0x3f9), width: 1, direction: .write), registers: r))
        #expect(!outDX.reproduces(X86ExitAccess(.port(0x3f8), width: 2, direction: .write), registers: r))
        #expect(!outDX.reproduces(X86ExitAccess(.port(0x3f8), width: 1, direction: .read), registers: r))
        let inImm = try d.decode([0xe5, 0x60])
        #expect(inImm.reproduces(X86ExitAccess(PortIO(port: 0x60, size: 4, direction: .read)), registers: r))
        #expect(!inImm.reproduces(X86ExitAccess(.port(0x61), width: 4, direction: .read), registers: r))
        let repOutsw = try d.decode([0xf3, 0x66, 0x6f])
        #expect(repOutsw.reproduces(X86ExitAccess(PortIO(port: 0x3f8, size: 2, count: 8, direction: .write)), registers: r))
        let insd = try d.decode([0x6d])
        #expect(insd.reproduces(X86ExitAccess(.port(0x3f8), width: 4, direction: .read), registers: r))
        // A memory store never reproduces a port access, and vice versa.
        #expect(!(try d.decode([0x89, 0x06])).reproduces(X86ExitAccess(.port(0x3f8), width: 4, direction: .write), registers: r))
        #expect(!outDX.reproduces(X86ExitAccess(.memory(GuestAddress(0x3f8)), width: 1, direction: .write), registers: r))
    }

    @Test("MMIO: the effective address must translate to the exit's address, with its width and direction")
    func mmio() throws {
        var g = try PagedGuest()
        let c = try g.context()
        var r = Registers()
        r.rsi = 0x20000 - 0x40 + 0x10 // [rsi + 0x40] = VA 0x20010 -> PA 0xb010
        let store = try d.decode([0x89, 0x46, 0x40])
        #expect(store.reproduces(X86ExitAccess(MMIOAccess(address: GuestAddress(0xb010), size: 4, direction: .write)), registers: r, context: c))
        #expect(!store.reproduces(X86ExitAccess(.memory(GuestAddress(0x20010)), width: 4, direction: .write), registers: r, context: c),
                "the virtual address is not the physical one")
        #expect(!store.reproduces(X86ExitAccess(.memory(GuestAddress(0xb010)), width: 2, direction: .write), registers: r, context: c))
        #expect(!store.reproduces(X86ExitAccess(.memory(GuestAddress(0xb010)), width: 4, direction: .read), registers: r, context: c))
        // A load: mov eax, [rsi + 0x40]
        let load = try d.decode([0x8b, 0x46, 0x40])
        #expect(load.reproduces(X86ExitAccess(.memory(GuestAddress(0xb010)), width: 4, direction: .read), registers: r, context: c))
        // RIP-relative store at VA 0x10000: mov dword ptr [rip + 0xfffa], eax -> 0x10006 + 0xfffa = 0x20000
        let rel = try d.decode([0x89, 0x05, 0xfa, 0xff, 0x00, 0x00], address: 0x10000)
        #expect(rel.reproduces(X86ExitAccess(.memory(GuestAddress(0xb000)), width: 4, direction: .write), registers: r, context: c))
        // SSE store, reported by Capstone as a read: movups [rsi + 0x40], xmm0 exits as two 8-byte writes.
        let sse = try d.decode([0x0f, 0x11, 0x46, 0x40])
        #expect(sse.reproduces(X86ExitAccess(.memory(GuestAddress(0xb010)), width: 8, direction: .write), registers: r, context: c))
        #expect(sse.reproduces(X86ExitAccess(.memory(GuestAddress(0xb018)), width: 8, direction: .write), registers: r, context: c))
        #expect(!sse.reproduces(X86ExitAccess(.memory(GuestAddress(0xb010)), width: 8, direction: .read), registers: r, context: c))
        // Read-modify-write matches both directions; a locked one too.
        let lockAdd = try d.decode([0xf0, 0x01, 0x46, 0x40])
        #expect(lockAdd.reproduces(X86ExitAccess(.memory(GuestAddress(0xb010)), width: 4, direction: .read), registers: r, context: c))
        #expect(lockAdd.reproduces(X86ExitAccess(.memory(GuestAddress(0xb010)), width: 4, direction: .write), registers: r, context: c))
        // Unmapped data page: no match, no crash.
        r.rsi = 0x30000
        #expect(!store.reproduces(X86ExitAccess(.memory(GuestAddress(0xb010)), width: 4, direction: .write), registers: r, context: c))
        // lea names memory but does not access it.
        r.rsi = 0x20000 - 0x40 + 0x10
        #expect(!(try d.decode([0x48, 0x8d, 0x46, 0x40])).reproduces(X86ExitAccess(.memory(GuestAddress(0xb010)), width: 8, direction: .read), registers: r, context: c))
        // Without a context, linear = physical.
        r.rsi = 0xd000_0000 - 0x40
        #expect(store.reproduces(X86ExitAccess(.memory(GuestAddress(0xd000_0000)), width: 4, direction: .write), registers: r))
        g.sregs.cr0 = 0x11
        g.sregs.efer = 0
        g.sregs.cs = Segment(selector: 0x8, type: 0xb, db: true)
        #expect(try g.context().mode == .bits32)
    }

    @Test("a store crossing a page exits in two pieces, each matched at its own physical page")
    func pageSplit() throws {
        let g = try PagedGuest()
        let c = try g.context()
        var r = Registers()
        r.rsi = 0x10ffe // VA 0x10ffe..0x11002: PA 0x9ffe..0x9fff then 0x7000..0x7001
        let store = try d.decode([0x89, 0x06])
        #expect(store.reproduces(X86ExitAccess(.memory(GuestAddress(0x9ffe)), width: 2, direction: .write), registers: r, context: c))
        #expect(store.reproduces(X86ExitAccess(.memory(GuestAddress(0x7000)), width: 2, direction: .write), registers: r, context: c))
        #expect(!store.reproduces(X86ExitAccess(.memory(GuestAddress(0x7001)), width: 2, direction: .write), registers: r, context: c))
    }

    @Test("string instructions match with their address registers advanced by one element")
    func strings() throws {
        var r = Registers()
        r.rdi = 0xd000_0004 // rep stosd, one element done
        let stos = try d.decode([0xf3, 0xab])
        #expect(stos.reproduces(X86ExitAccess(.memory(GuestAddress(0xd000_0000)), width: 4, direction: .write), registers: r))
        #expect(stos.reproduces(X86ExitAccess(.memory(GuestAddress(0xd000_0004)), width: 4, direction: .write), registers: r))
        #expect(!stos.reproduces(X86ExitAccess(.memory(GuestAddress(0xd000_000c)), width: 4, direction: .write), registers: r))
    }

    @Test("locating: candidates behind RIP and at RIP, kept only when their operands reproduce the exit")
    func locate() throws {
        let g = try PagedGuest()
        // mov edx, 0x3f8 ; out dx, al ; mov dword ptr [rsi + 0x40], eax ; in al, dx
        let code: [UInt8] = [0xba, 0xf8, 0x03, 0x00, 0x00, 0xee, 0x89, 0x46, 0x40, 0xec]
        try g.write(code, at: 0x10ffb) // straddles the page boundary
        let c = try g.context()
        var r = Registers()
        r.rdx = 0x3f8
        r.rsi = 0x20000 - 0x40
        // RIP past the out.
        let out = d.candidates(reproducing: X86ExitAccess(.port(0x3f8), width: 1, direction: .write), rip: 0x11001, registers: r, context: c)
        #expect(out.endingAt.map(\.address) == [0x11000] && out.startingAt == nil)
        // RIP past the store (hardware MMIO store).
        let st = d.candidates(reproducing: X86ExitAccess(.memory(GuestAddress(0xb000)), width: 4, direction: .write), rip: 0x11004, registers: r, context: c)
        #expect(st.endingAt.map(\.description) == ["mov dword ptr [rsi + 0x40], eax"] && st.startingAt == nil)
        // RIP on the in (this machine).
        let inb = d.candidates(reproducing: X86ExitAccess(.port(0x3f8), width: 1, direction: .read), rip: 0x11004, registers: r, context: c)
        #expect(inb.startingAt?.mnemonic == "in" && inb.endingAt.isEmpty)
        // A port the code does not use: nothing.
        let none = d.candidates(reproducing: X86ExitAccess(.port(0x60), width: 1, direction: .write), rip: 0x11001, registers: r, context: c)
        #expect(none.endingAt.isEmpty && none.startingAt == nil)
    }
}

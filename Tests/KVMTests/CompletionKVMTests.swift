import Testing
import VMMKit

/// One bracketed access: the exit, RIP before and after the completion, the registers after.
struct Bracket {
    var exit: VMExit
    var before: UInt64
    var after: Registers
    var site: ResolvedSite
}

final class BracketRecorder: @unchecked Sendable {
    var brackets: [Bracket] = []
    var refusals = 0
}

/// Completing the pending access from a handler (in the serialized KVM suite).
extension KVMTests {
    // At 0x100000, CPL0, long mode, identity-mapped:
    //   +0  mov dx, 0x703        66 ba 03 07
    //   +4  in al, dx            ec            (port read)
    //   +5  out dx, al           ee            (port write)
    //   +6  mov eax, 0xc0000000  b8 00 00 00 c0
    //   +11 mov ebx, [rax]       8b 18         (MMIO load)
    //   +13 mov [rax+8], ebx     89 58 08      (MMIO store)
    //   +16 mov al, 0; out 0xf4, al
    static let bracketCode: [UInt8] = [0x66, 0xba, 0x03, 0x07, 0xec, 0xee, 0xb8, 0x00, 0x00, 0x00, 0xc0,
                                       0x8b, 0x18, 0x89, 0x58, 0x08, 0xb0, 0x00, 0xe6, 0xf4]

    @Test("completePendingAccess brackets an in, an out, an MMIO load and an MMIO store; loads land before RIP moves on")
    func bracketAccesses() throws {
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
        let port = Recorder(value: 0x5a)
        let mmio = Recorder(value: 0x1234_5678)
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        try vm.bus.attach(port, ports: 0x703..<0x704)
        try vm.bus.attach(mmio, mmio: GuestRange(start: GuestAddress(0xc000_0000), size: 0x1000))
        let rec = BracketRecorder()
        vm.addExitHandler(ClosureExitHandler { (exit, ctx) throws(VMError) -> ExitResult in
            switch exit {
            case .io(let io) where io.port == 0x703: break
            case .mmio: break
            default: return .pass
            }
            let before = try ctx.registers().rip
            let r = try ctx.forward(exit)
            let site = try ctx.resolveSite()
            let after = try ctx.completePendingAccess()
            rec.brackets.append(Bracket(exit: exit, before: before, after: after, site: site))
            return r
        })
        _ = try X86Boot.load(.flat(KVMTests.bracketCode), into: vm)
        #expect(try vm.run() == .guestExit(status: 0))
        try #require(rec.brackets.count == 4, "\(rec.brackets.map(\.exit))")
        let base: UInt64 = 0x10_0000
        // (instruction start, length) of the in, out, load, store.
        let instructions: [(UInt64, UInt64)] = [(base + 4, 1), (base + 5, 1), (base + 11, 2), (base + 13, 3)]
        for (b, (start, length)) in zip(rec.brackets, instructions) {
            #expect(b.after.rip == start + length, "RIP past the instruction after completion: \(b.exit)")
            #expect(b.before == start || b.before == start + length, "RIP at the exit is on or past the instruction: \(b.exit)")
            if b.before == start {
                #expect(b.site.position == .onInstruction(length: Int(length)), "\(b.exit)")
                #expect(b.site.instructionStart == GuestAddress(start), "identity map: the instruction's physical address")
            } else {
                #expect(b.site.position == .pastInstruction, "\(b.exit)")
            }
            #expect(b.site.physicalRIP == GuestAddress(b.before))
        }
        // The loads landed: AL from the port, EBX from MMIO; the store carried EBX.
        #expect(rec.brackets[0].after.rax & 0xff == 0x5a)
        #expect(rec.brackets[2].after.rbx & 0xffff_ffff == 0x1234_5678)
        #expect(mmio.writes.count == 1 && mmio.writes[0].2 == 0x1234_5678)
        #expect(port.writes.count == 1 && port.writes[0].2 == 0x5a)
        // This machine (PVM): in and MMIO loads exit on the instruction. Hardware KVM may differ for out.
        #expect(rec.brackets[0].site.position == .onInstruction(length: 1))
        #expect(rec.brackets[2].site.position == .onInstruction(length: 2))
    }

    @Test("setRegisters during a pending MMIO load is refused; after completePendingAccess the change and the load both stick")
    func setRegistersAfterCompletion() throws {
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
        let mmio = Recorder(value: 0x1234_5678)
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        try vm.bus.attach(Recorder(value: 0x5a), ports: 0x703..<0x704)
        try vm.bus.attach(mmio, mmio: GuestRange(start: GuestAddress(0xc000_0000), size: 0x1000))
        let refused = BracketRecorder()
        vm.addExitHandler(ClosureExitHandler { (exit, ctx) throws(VMError) -> ExitResult in
            guard case .mmio(let m) = exit, m.direction == .read else { return .pass }
            let r = try ctx.forward(exit)
            do throws(VMError) { try ctx.setRegisters(try ctx.registers()) } catch {
                if case .accessPending = error { refused.refusals += 1 }
            }
            var after = try ctx.completePendingAccess()
            after.rcx = 0x77
            try ctx.setRegisters(after)
            return r
        })
        _ = try X86Boot.load(.flat(KVMTests.bracketCode), into: vm)
        #expect(try vm.run() == .guestExit(status: 0))
        #expect(refused.refusals == 1)
        let regs = try vm.vcpus[0].registers()
        #expect(regs.rbx & 0xffff_ffff == 0x1234_5678, "the load survived the register write")
        #expect(regs.rcx == 0x77)
        #expect(mmio.writes.count == 1 && mmio.writes[0].2 == 0x1234_5678, "the store after it saw the loaded value")
    }
}

import Synchronization
import Testing
import VMMKit
import X86Disassembler

/// The state a handler saw at one exit.
struct SeenExit: Sendable {
    var access: X86ExitAccess
    var registers: Registers
    var specialRegisters: SpecialRegisters
}

/// Locating the exiting instruction by operands on real KVM (in the serialized KVM suite).
extension KVMTests {
    @Test("each exit is matched to its instruction by operands: RIP past an out and an MMIO store, on an MMIO load")
    func locateByOperands() throws {
        let code: [UInt8] = [
            0xba, 0x04, 0x07, 0x00, 0x00, // +0  mov edx, 0x704
            0xb0, 0x41,                   // +5  mov al, 0x41
            0xee,                         // +7  out dx, al         (straddles nothing; the next one does)
            0xbe, 0xc0, 0xff, 0xff, 0xbf, // +8  mov esi, 0xbfffffc0 (crosses the page at 0x101000)
            0x89, 0x46, 0x44,             // +13 mov [rsi + 0x44], eax -> GPA 0xc0000004
            0x8b, 0x5e, 0x48,             // +16 mov ebx, [rsi + 0x48] -> GPA 0xc0000008
            0xb0, 0x05, 0xe6, 0xf4,       // +19 mov al, 5; out 0xf4, al
        ]
        let base: UInt64 = 0x100ff6
        let seen = Mutex<[SeenExit]>([])
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
        vm.addExitHandler(ClosureExitHandler { (exit: VMExit, ctx: ExitContext) throws(VMError) -> ExitResult in
            let access: X86ExitAccess
            switch exit {
            case .io(let io) where io.port == 0x704: access = X86ExitAccess(io)
            case .mmio(let m): access = X86ExitAccess(m)
            default: return .pass
            }
            let e = SeenExit(access: access, registers: try ctx.registers(), specialRegisters: try ctx.specialRegisters())
            seen.withLock { $0.append(e) }
            return .pass
        })
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        try vm.bus.attach(Recorder(), ports: 0x704..<0x705)
        try vm.bus.attach(Recorder(value: 7), mmio: GuestRange(start: GuestAddress(0xc000_0000), size: 0x1000))
        _ = try X86Boot.load(.flat(code, loadAddress: base), into: vm)
        #expect(try vm.run() == .guestExit(status: 5))

        let exits = seen.withLock { $0 }
        #expect(exits.map(\.access.description) == ["port 0x704 write1", "mmio 0xc0000004 write4", "mmio 0xc0000008 read4"])
        let d = try X86Disassembler()
        var located: [UInt64] = []
        var outCandidates = 0
        for e in exits {
            let context = try X86CodeContext(memory: vm.memory, specialRegisters: e.specialRegisters)
            #expect(context.mode == .bits64)
            let c = d.candidates(reproducing: e.access, rip: e.registers.rip, registers: e.registers, context: context)
            if let at = c.startingAt {
                #expect(c.endingAt.isEmpty)
                located.append(at.address)
                continue
            }
            // Behind RIP the bytes can end in several decodings that all reproduce the exit
            // (`b0 41 ee`: `out dx, al` at +7, and `41 ee`, the same with a REX prefix, at +6);
            // a forward decode from a known start settles which one ran.
            #expect(!c.endingAt.isEmpty)
            if case .port = e.access.target { outCandidates = c.endingAt.count }
            let confirmed = d.instruction(endingAt: e.registers.rip, decodingFrom: base, in: context)
            #expect(confirmed.map { i in c.endingAt.contains { $0.address == i.address } } == true)
            if let i = confirmed { located.append(i.address) }
        }
        #expect(located == [base + 7, base + 13, base + 16])
        #expect(outCandidates == 2, "the REX-prefixed reading of the out survives too")
    }
}

import DMP
import Synchronization
import Testing
import VMMKit
import VMMKitTesting
import X86Disassembler

/// Answers reads with a constant, ignores writes.
final class ConstantDevice: BusDevice, @unchecked Sendable {
    let name = "constant"
    func read(offset: UInt64, size: Int) -> UInt64 { 0x20 }
    func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect { .none }
}

/// What the locating handler found, per exit.
final class LocateLog: @unchecked Sendable {
    private let results = Mutex<[Result<LocatedInstruction, DMPRefusal>]>([])
    func append(_ r: Result<LocatedInstruction, DMPRefusal>) { results.withLock { $0.append(r) } }
    var all: [Result<LocatedInstruction, DMPRefusal>] { results.withLock { $0 } }
    var located: [LocatedInstruction] { all.compactMap { try? $0.get() } }
    var refusals: [DMPRefusal] { all.compactMap { if case .failure(let e) = $0 { e } else { nil } } }
}

/// A locator handed to a vCPU thread's handler (one vCPU: calls never overlap).
final class LocatorBox: @unchecked Sendable {
    let locator: SiteLocator
    init(_ locator: SiteLocator) { self.locator = locator }
}

/// The test code, loaded at 0x100000 in the platform's long mode and identity map.
let codeBase: UInt64 = 0x10_0000
let locatorCode: [UInt8] = [
    0xba, 0xf8, 0x03, 0x00, 0x00, // +0  mov edx, 0x3f8
    0xee,                         // +5  out dx, al
    0xec,                         // +6  in al, dx
    0x8b, 0x5e, 0x48,             // +7  mov ebx, [rsi + 0x48]   (rsi = 0xcfffffbc: GPA 0xd0000004)
    0x89, 0x46, 0x44,             // +10 mov [rsi + 0x44], eax   (GPA 0xd0000000)
    0xb0, 0x41,                   // +13 mov al, 0x41
    0xee,                         // +15 out dx, al   (bytes before: 41 ee, also an out)
    0xfb,                         // +16 sti
    0xec,                         // +17 in al, dx    (in sti's shadow)
    0xf4,                         // +18 hlt
    0xfb,                         // +19 sti
    0xee,                         // +20 out dx, al   (in sti's shadow, RIP past it on PVM)
]
let locatorSymbols = SymbolTable([GuestSymbol(name: "f", address: codeBase, size: UInt64(locatorCode.count), isFunction: true)])

let portOut = PortIO(port: 0x3f8, size: 1, direction: .write, value: 0x41)
let portIn = PortIO(port: 0x3f8, size: 1, direction: .read)
let mmioRead = MMIOAccess(address: GuestAddress(0xd000_0004), size: 4, direction: .read)
let mmioWrite = MMIOAccess(address: GuestAddress(0xd000_0000), size: 4, direction: .write, value: 7)

/// A mock VM running `locatorCode`, with a handler that serves each access through the chain and then locates it.
func locatorVM(_ model: MockRIPModel, symbols: SymbolTable = SymbolTable(), rip: UInt64,
               setup: (MockVCPU) -> Void = { _ in }) throws -> (VirtualMachine, MockVCPU, LocateLog) {
    let mock = MockHypervisor()
    let vm = try VirtualMachine(backend: mock, configuration: VMConfiguration(memorySize: 32 << 20))
    let dev = ConstantDevice()
    try vm.bus.attach(dev, ports: 0x3f8..<0x400)
    try vm.bus.attach(dev, mmio: GuestRange(start: GuestAddress(0xd000_0000), size: 0x1000))
    _ = try X86Boot.load(.flat(locatorCode, loadAddress: codeBase), into: vm)
    let v = try #require(mock.vcpu(0))
    v.ripModel = model
    v.currentRegisters.rip = rip
    v.currentRegisters.rdx = 0x3f8
    v.currentRegisters.rsi = 0xcfff_ffbc
    setup(v)
    let log = LocateLog()
    let box = LocatorBox(try SiteLocator(symbols: symbols))
    vm.addExitHandler(ClosureExitHandler { (exit, ctx) throws(VMError) -> ExitResult in
        switch exit {
        case .io, .mmio, .msrRead: break
        default: return .pass
        }
        if ctx.isCompletingAccess { return .pass }
        let r = exit.kind == .msr ? ExitResult.handled : try ctx.forward(exit)
        do throws(DMPRefusal) { log.append(.success(try box.locator.locate(exit, context: ctx))) } catch { log.append(.failure(error)) }
        return r
    })
    return (vm, v, log)
}

@Suite("SiteLocator: bracketing, operand matching, confirmation, refusals (mock backend)")
struct SiteLocatorTests {
    @Test("RIP on the instruction (in, MMIO load on both models; out on hardware): the bracketed instruction",
          arguments: [
            (MockRIPModel.pvm, VMExit.io(portIn), UInt64(6), UInt8(1), "in"),
            (.hardware, .io(portIn), 6, 1, "in"),
            (.hardware, .io(portOut), 5, 1, "out"),
            (.pvm, .mmio(mmioRead), 7, 3, "mov"),
            (.hardware, .mmio(mmioRead), 7, 3, "mov"),
          ])
    func onInstruction(model: MockRIPModel, exit: VMExit, offset: UInt64, length: UInt8, mnemonic: String) throws {
        let (vm, v, log) = try locatorVM(model, rip: codeBase + offset)
        v.script([.access(exit, length: length, destination: .rbx)])
        #expect(try vm.run() == .halted)
        let l = try #require(log.located.first, "\(log.refusals)")
        #expect(l.virtualAddress == codeBase + offset)
        #expect(l.physicalAddress == GuestAddress(codeBase + offset), "identity map")
        #expect(l.instruction.mnemonic == mnemonic)
        #expect(l.instruction.length == Int(length))
        #expect(l.position == .onInstruction(length: Int(length)))
        #expect(l.confirmation == .bracketed)
        #expect(l.cpl == 0)
        #expect(l.addressSpace == X86Layout.pml4)
        #expect(l.paging.mode == .fourLevel)
        #expect(v.currentRegisters.rip == codeBase + offset + UInt64(length), "the access was completed")
    }

    @Test("RIP already past (out and MMIO store on PVM, MMIO store on hardware): the candidate ending at RIP that reproduces the exit",
          arguments: [
            (MockRIPModel.pvm, VMExit.io(portOut), UInt64(5), UInt8(1), "out"),
            (.pvm, .mmio(mmioWrite), 10, 3, "mov"),
            (.hardware, .mmio(mmioWrite), 10, 3, "mov"),
          ])
    func pastInstruction(model: MockRIPModel, exit: VMExit, offset: UInt64, length: UInt8, mnemonic: String) throws {
        for symbols in [SymbolTable(), locatorSymbols] {
            let (vm, v, log) = try locatorVM(model, symbols: symbols, rip: codeBase + offset)
            v.script([.access(exit, length: length)])
            #expect(try vm.run() == .halted)
            let l = try #require(log.located.first, "\(log.refusals)")
            #expect(l.virtualAddress == codeBase + offset)
            #expect(l.instruction.mnemonic == mnemonic)
            #expect(l.position == .pastInstruction)
            #expect(l.confirmation == (symbols.symbols.isEmpty ? .unconfirmed : .symbol("f")))
        }
    }

    @Test("several candidates ending at RIP reproduce an out (41 ee and ee): ambiguous without a symbol, settled by the forward decode with one")
    func ambiguity() throws {
        let (vm, v, log) = try locatorVM(.pvm, rip: codeBase + 15)
        v.script([.access(.io(portOut), length: 1)])
        #expect(try vm.run() == .halted)
        let r = try #require(log.refusals.first)
        #expect(r.stage == .locate)
        #expect(r.reason.hasPrefix("ambiguous: 2 instructions"), "\(r)")

        let (vm2, v2, log2) = try locatorVM(.pvm, symbols: locatorSymbols, rip: codeBase + 15)
        v2.script([.access(.io(portOut), length: 1)])
        #expect(try vm2.run() == .halted)
        let l = try #require(log2.located.first, "\(log2.refusals)")
        #expect(l.virtualAddress == codeBase + 15)
        #expect(l.instruction.bytes == [0xee])
        #expect(l.confirmation == .symbol("f"))
    }

    @Test("an exit no instruction reproduces is refused: wrong port in DX (RIP past), wrong width (RIP on)")
    func noSurvivor() throws {
        let (vm, v, log) = try locatorVM(.pvm, rip: codeBase + 5)
        v.script([.access(.io(PortIO(port: 0x3f9, size: 1, direction: .write, value: 0)), length: 1)])
        #expect(try vm.run() == .halted)
        #expect(log.refusals.first?.reason.hasPrefix("no instruction ending at RIP") == true, "\(log.refusals)")

        let (vm2, v2, log2) = try locatorVM(.pvm, rip: codeBase + 7)
        v2.script([.access(.mmio(MMIOAccess(address: GuestAddress(0xd000_0004), size: 2, direction: .read)), length: 3)])
        #expect(try vm2.run() == .halted)
        #expect(log2.refusals.first?.reason.contains("does not reproduce the exit") == true, "\(log2.refusals)")
    }

    @Test("RIP moving by more or less than the decoded instruction is refused")
    func lengthDisagreement() throws {
        let (vm, v, log) = try locatorVM(.hardware, rip: codeBase + 6)
        v.script([.access(.io(portIn), length: 2)])
        #expect(try vm.run() == .halted)
        #expect(log.refusals.first?.reason.contains("RIP moved 2 bytes") == true, "\(log.refusals)")
    }

    @Test("an instruction in an interrupt shadow is refused: the vCPU events say so, or sti precedes it")
    func interruptShadow() throws {
        let (vm, v, log) = try locatorVM(.pvm, rip: codeBase + 6) { v in
            var e = [UInt8](repeating: 0, count: 64)
            e[11] = 2 // KVM_X86_SHADOW_INT_STI
            e[20] = 4 // KVM_VCPUEVENT_VALID_SHADOW
            try? v.setVCPUEvents(VCPUEvents(bytes: e))
        }
        v.script([.access(.io(portIn), length: 1)])
        #expect(try vm.run() == .halted)
        #expect(log.refusals.first?.reason.contains("interrupt shadow (after sti)") == true, "\(log.refusals)")

        let (vm2, v2, log2) = try locatorVM(.pvm, symbols: locatorSymbols, rip: codeBase + 17)
        v2.script([.access(.io(portIn), length: 1)])
        #expect(try vm2.run() == .halted)
        #expect(log2.refusals.first?.reason.contains("follows sti") == true, "\(log2.refusals)")

        // RIP past the out: the events show no shadow any more; the bytes before it (or the symbol) still refuse it.
        for symbols in [SymbolTable(), locatorSymbols] {
            let (vm3, v3, log3) = try locatorVM(.pvm, symbols: symbols, rip: codeBase + 20)
            v3.script([.access(.io(portOut), length: 1)])
            #expect(try vm3.run() == .halted)
            let reason = log3.refusals.first?.reason ?? "located"
            #expect(reason.contains(symbols.symbols.isEmpty ? "may follow sti (no symbol to decode from)" : "follows sti: in an interrupt shadow"), "\(reason)")
        }
    }

    @Test("compatibility-mode code and exits that are not accesses are refused")
    func otherRefusals() throws {
        let (vm, v, log) = try locatorVM(.pvm, rip: codeBase + 6) { v in
            var s = (try? v.specialRegisters()) ?? SpecialRegisters()
            s.cs.l = false
            try? v.setSpecialRegisters(s)
        }
        v.script([.access(.io(portIn), length: 1), .exit(.msrRead(index: 0x10))])
        #expect(try vm.run() == .halted)
        let reasons = log.refusals.map(\.reason)
        #expect(reasons.count == 2)
        #expect(reasons.first?.contains("compatibility-mode") == true)
        #expect(reasons.last?.hasPrefix("not a port I/O or MMIO exit") == true)
    }
}

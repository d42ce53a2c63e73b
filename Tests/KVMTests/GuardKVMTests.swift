import Testing
import VMMKit
import X86Disassembler
#if canImport(Glibc)
import Glibc
#endif

/// What a guard listener heard (shared with vCPU threads).
final class GuardRecorder: PageGuardListener, @unchecked Sendable {
    private var m = pthread_mutex_t()
    private var _writes: [GuardedWrite] = []
    private var _failures: [GuardedEmulationFailure] = []
    let onFailure: @Sendable (GuardedEmulationFailure, ExitContext) -> GuardDecision
    init(onFailure: @escaping @Sendable (GuardedEmulationFailure, ExitContext) -> GuardDecision = { _, _ in .fail }) {
        pthread_mutex_init(&m, nil)
        self.onFailure = onFailure
    }
    private func locked<R>(_ body: () -> R) -> R { pthread_mutex_lock(&m); defer { pthread_mutex_unlock(&m) }; return body() }
    var writes: [GuardedWrite] { locked { _writes } }
    var failures: [GuardedEmulationFailure] { locked { _failures } }
    func guardedWrite(_ write: GuardedWrite, context: ExitContext?) { locked { _writes.append(write) } }
    func guardedEmulationFailure(_ failure: GuardedEmulationFailure, context: ExitContext) -> GuardDecision {
        locked { _failures.append(failure) }
        return onFailure(failure, context)
    }
}

/// Page guards on real KVM (in the serialized KVM suite). The guests are flat
/// long-mode binaries at 0x100000 (their code page has slots of its own); the
/// data page is 0x300000.
extension KVMTests {
    static let dataPage = GuestRange(start: GuestAddress(0x30_0000), size: 4096)
    static let codePage = GuestRange(start: GuestAddress(0x10_0000), size: 4096)

    /// A VM running `code` with the debug-exit port and a handler that guards
    /// `ranges` when the guest writes port 0x80.
    func guardedVM(_ code: [UInt8], protectOnPort80 ranges: [GuestRange], listener: GuardRecorder, userMode: Bool = false) throws -> VirtualMachine {
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        vm.setPageGuardListener(listener)
        vm.addExitHandler(ClosureExitHandler { exit, ctx throws(VMError) in
            guard case .io(let io) = exit, io.port == 0x80 else { return .pass }
            do { try ctx.vm.slots.protect(ranges) } catch { throw VMError.invalidState("protect: \(error)") }
            return .handled
        })
        _ = try X86Boot.load(.flat(code), into: vm)
        if userMode { try X86Boot.enterUserMode(vm) }
        return vm
    }

    @Test("a running guest writes into a guarded page of its own code and into a guarded data page: the writes land and are reported")
    func guardedCodeWrite() throws {
        let code: [UInt8] = [
            0xb0, 0x01, 0xe6, 0x80,                         // mov al, 1; out 0x80, al   (the host guards both pages)
            0x48, 0x8d, 0x3d, 0x1d, 0x00, 0x00, 0x00,       // lea rdi, [rip + 0x1d]     (-> offset 40, in this code page)
            0xc7, 0x07, 0x44, 0x33, 0x22, 0x11,             // mov dword [rdi], 0x11223344
            0x8b, 0x07,                                     // mov eax, [rdi]
            0xe7, 0x81,                                     // out 0x81, eax
            0x48, 0xc7, 0xc6, 0x00, 0x00, 0x30, 0x00,       // mov rsi, 0x300000
            0x48, 0x89, 0x06,                               // mov [rsi], rax
            0xb0, 0x00, 0xe6, 0xf4,                         // mov al, 0; out 0xf4, al
            0x90, 0x90, 0x90, 0x90, 0x90,                   // (pad to 40)
            0x00, 0x00, 0x00, 0x00,                         // offset 40: the word written
        ]
        let log = GuardRecorder()
        let echo = Recorder()
        let vm = try guardedVM(code, protectOnPort80: [KVMTests.codePage, KVMTests.dataPage], listener: log)
        try vm.bus.attach(echo, ports: 0x81..<0x82)
        #expect(try vm.run() == .guestExit(status: 0))
        #expect(try vm.memory.read(UInt32.self, at: GuestAddress(0x10_0028)) == 0x1122_3344, "the store into the code page landed")
        #expect(try vm.memory.read(UInt64.self, at: KVMTests.dataPage.start) == 0x1122_3344)
        #expect(echo.writes.map(\.2) == [0x1122_3344], "the guest read its own store back")
        #expect(log.writes == [GuardedWrite(range: GuestRange(start: GuestAddress(0x10_0028), size: 4), source: .guest(vcpu: 0)),
                               GuardedWrite(range: GuestRange(start: KVMTests.dataPage.start, size: 8), source: .guest(vcpu: 0))])
        #expect(vm.slots.slot(containing: KVMTests.codePage.start)?.range == KVMTests.codePage)
        #expect(vm.slots.slot(containing: KVMTests.codePage.start)?.readOnly == true)
        #expect(vm.statistics()[.mmio] == 2, "one exit per guarded store")
        let quirks = UInt64(UInt32(bitPattern: vm.backend.checkExtension(Int32(KVMCapability.disableQuirks2))))
        #expect(vm.slots.zapAllQuirkDisabled == (quirks & KVMCapability.x86QuirkSlotZapAll != 0), "disabled wherever KVM allows it")
    }

    @Test("protect while a guest runs: every later store into the page is reported, a host write too, and nothing is lost")
    func protectWhileGuestRuns() throws {
        let code: [UInt8] = [
            0x48, 0xc7, 0xc7, 0x00, 0x00, 0x30, 0x00,       // mov rdi, 0x300000
            0x48, 0x83, 0x07, 0x01,                         // loop: add qword [rdi], 1
            0x48, 0x83, 0x7f, 0x08, 0x00,                   // cmp qword [rdi + 8], 0
            0x74, 0xf5,                                     // je loop
            0xb0, 0x00, 0xe6, 0xf4,                         // mov al, 0; out 0xf4, al
        ]
        let log = GuardRecorder()
        let vm = try guardedVM(code, protectOnPort80: [], listener: log)
        try vm.start()
        var c0: UInt64 = 0
        for _ in 0..<500 where c0 == 0 {
            usleep(2_000)
            c0 = try vm.memory.read(UInt64.self, at: KVMTests.dataPage.start)
        }
        #expect(vm.pauseAll())
        c0 = try vm.memory.read(UInt64.self, at: KVMTests.dataPage.start)
        try vm.slots.protect(KVMTests.dataPage)
        vm.resumeAll()
        usleep(30_000)
        try vm.memory.write(UInt64(1), at: GuestAddress(KVMTests.dataPage.start.rawValue + 8))
        #expect(try vm.wait() == .guestExit(status: 0))
        let c1 = try vm.memory.read(UInt64.self, at: KVMTests.dataPage.start)
        let guest = log.writes.filter { $0.source == .guest(vcpu: 0) }
        #expect(c0 > 0, "the guest ran before the guard")
        #expect(UInt64(guest.count) == c1 - c0, "each increment after the guard exited once and landed")
        #expect(guest.allSatisfy { $0.range == GuestRange(start: KVMTests.dataPage.start, size: 8) })
        #expect(log.writes.filter { $0.source == .host } == [GuardedWrite(range: GuestRange(start: GuestAddress(0x30_0008), size: 8), source: .host)])
    }

    @Test("a store KVM cannot emulate (CPL3) into a guarded page reaches the listener, which unguards and re-runs it")
    func guardedEmulationFailure() throws {
        let code: [UInt8] = [
            0x48, 0xc7, 0xc7, 0x00, 0x00, 0x30, 0x00,       // mov rdi, 0x300000
            0xb0, 0x01, 0xe6, 0x80,                         // mov al, 1; out 0x80, al   (the host guards the page)
            0x66, 0x0f, 0xd6, 0x07,                         // movq [rdi], xmm0 (xmm0 is 0 from reset)
            0xb0, 0x00, 0xe6, 0xf4,                         // mov al, 0; out 0xf4, al
        ]
        let log = GuardRecorder { failure, ctx in
            do { try ctx.vm.slots.unprotect(KVMTests.dataPage) } catch { return .fail }
            return .retry
        }
        // At CPL3: this host emulates CPL0 code, and its emulator cannot run `movq` at all.
        let vm = try guardedVM(code, protectOnPort80: [KVMTests.dataPage], listener: log, userMode: true)
        vm.setEmulationFailureResolver(try X86EmulationFailureResolver())
        try vm.memory.write(UInt64.max, at: KVMTests.dataPage.start)
        #expect(try vm.run() == .guestExit(status: 0))
        #expect(try vm.memory.read(UInt64.self, at: KVMTests.dataPage.start) == 0, "the store ran after the page was unguarded")
        #expect(log.failures.count == 1)
        #expect(log.failures.first?.rip == 0x10_000b, "RIP on the failing store")
        #expect(log.failures.first.map { $0.instructionBytes.starts(with: [0x66, 0x0f, 0xd6, 0x07]) } == true)
        #expect(log.failures.first?.writes == [GuestRange(start: KVMTests.dataPage.start, size: 8)], "the resolver found the store's bytes")
        #expect(vm.memory.protectedRanges.isEmpty)
    }
}

/// Emulation failures away from the guards (real KVM).
extension KVMTests {
    @Test("with the resolver, an instruction KVM cannot emulate that writes an unguarded page does not reach the listener")
    func unguardedEmulationFailure() throws {
        let code: [UInt8] = [
            0x48, 0xc7, 0xc7, 0x00, 0x20, 0x30, 0x00,       // mov rdi, 0x302000 (not guarded)
            0xb0, 0x01, 0xe6, 0x80,                         // mov al, 1; out 0x80, al   (the host guards 0x300000)
            0x66, 0x0f, 0xd6, 0x07,                         // movq [rdi], xmm0
            0xb0, 0x00, 0xe6, 0xf4,                         // mov al, 0; out 0xf4, al
        ]
        let log = GuardRecorder { _, _ in .retry }
        let vm = try guardedVM(code, protectOnPort80: [KVMTests.dataPage], listener: log)
        vm.setEmulationFailureResolver(try X86EmulationFailureResolver())
        // At CPL0 this host emulates the code and cannot run `movq`: the failure is the VM's, as
        // without guards. Where CPL0 runs natively the store simply lands.
        do {
            #expect(try vm.run() == .guestExit(status: 0))
        } catch VMError.guestFault(let f) {
            #expect(f.kind == .emulationFailure)
        }
        #expect(log.failures.isEmpty)
    }
}

/// Guest stores of every x86 store width at every alignment (real KVM).
extension KVMTests {
    /// One store: `mov rax, value; mov rdi, address; mov [rdi], al/ax/eax/rax`.
    static func store(_ width: Int, _ value: UInt64, at address: UInt64) -> [UInt8] {
        var c: [UInt8] = [0x48, 0xb8] + withUnsafeBytes(of: value.littleEndian, Array.init)
        c += [0x48, 0xc7, 0xc7] + withUnsafeBytes(of: UInt32(address).littleEndian, Array.init)
        switch width {
        case 1: c += [0x88, 0x07]
        case 2: c += [0x66, 0x89, 0x07]
        case 4: c += [0x89, 0x07]
        default: c += [0x48, 0x89, 0x07]
        }
        return c
    }

    @Test("guest stores of width 1, 2, 4 and 8 at every alignment into guarded pages, also across into an unguarded and into a guarded page, land exactly and are reported per page")
    func guardedStoreGrid() throws {
        // 0x300000 guarded, 0x301000 not; 0x302000 and 0x303000 guarded.
        let guarded = [GuestRange(start: GuestAddress(0x30_0000), size: 4096), GuestRange(start: GuestAddress(0x30_2000), size: 8192)]
        var cases: [(address: UInt64, width: Int, value: UInt64)] = []
        var n: UInt64 = 0
        for width in [1, 2, 4, 8] {
            for off in 0..<UInt64(8) {
                n += 1
                cases.append((0x30_0000 + off, width, 0x0102_0304_0506_0708 &* n))
                cases.append((0x30_1000 - 8 + off, width, 0x1122_3344_5566_7788 &* n))
                cases.append((0x30_3000 - 8 + off, width, 0x9988_7766_5544_3322 &* n))
            }
        }
        var code: [UInt8] = [0xb0, 0x01, 0xe6, 0x80] // mov al, 1; out 0x80, al: the host guards the pages
        for c in cases { code += KVMTests.store(c.width, c.value, at: c.address) }
        code += [0xb0, 0x00, 0xe6, 0xf4]
        #expect(code.count < 4096)
        var expected = [UInt8](repeating: 0, count: 0x4000)
        for c in cases {
            for b in 0..<c.width { expected[Int(c.address - 0x30_0000) + b] = UInt8(truncatingIfNeeded: c.value >> (8 * UInt64(b))) }
        }
        let log = GuardRecorder()
        let vm = try guardedVM(code, protectOnPort80: guarded, listener: log)
        #expect(try vm.run() == .guestExit(status: 0))
        #expect(try vm.memory.readBytes(at: GuestAddress(0x30_0000), count: 0x4000) == expected)
        // Every reported range lies in one guarded page; together they are exactly the stored bytes in guarded pages.
        var reported: [UInt64: Int] = [:]
        for w in log.writes {
            let s = w.range.start.rawValue
            #expect(guarded.contains { $0.contains(w.range.start, length: w.range.size) }, "\(w.range)")
            #expect(s >> 12 == (s + w.range.size - 1) >> 12, "one page per report: \(w.range)")
            for a in s..<(s + w.range.size) { reported[a, default: 0] += 1 }
        }
        var stored: [UInt64: Int] = [:]
        for c in cases {
            for a in c.address..<(c.address + UInt64(c.width)) where guarded.contains(where: { $0.contains(GuestAddress(a)) }) { stored[a, default: 0] += 1 }
        }
        #expect(reported == stored)
        #expect(log.writes.allSatisfy { $0.source == .guest(vcpu: 0) })
    }
}

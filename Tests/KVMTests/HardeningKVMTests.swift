import Testing
import VMMKit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Sends a signal to one thread every `intervalMicroseconds` until stopped (a process taking timer signals).
final class SignalStorm: @unchecked Sendable {
    private let stopFlag = Atomic<Bool>(false)
    let sent = Atomic<Int>(0)
    private var thread = pthread_t()
    private let target: pthread_t
    private let signal: Int32
    private let interval: UInt32
    private var oldAction = sigaction()

    init(signal: Int32, target: pthread_t, intervalMicroseconds: UInt32) {
        self.signal = signal
        self.target = target
        self.interval = intervalMicroseconds
        var sa = sigaction()
        sa.__sigaction_handler.sa_handler = { _ in }
        sigemptyset(&sa.sa_mask)
        sa.sa_flags = 0 // no SA_RESTART: the interrupted call sees EINTR
        sigaction(signal, &sa, &oldAction)
        let me = Unmanaged.passRetained(self)
        pthread_create(&thread, nil, { arg in
            let storm = Unmanaged<SignalStorm>.fromOpaque(arg!).takeRetainedValue()
            while !storm.stopFlag.load(ordering: .acquiring) {
                pthread_kill(storm.target, storm.signal)
                storm.sent.add(1, ordering: .relaxed)
                usleep(storm.interval)
            }
            return nil
        }, me.toOpaque())
    }

    func stop() {
        stopFlag.store(true, ordering: .releasing)
        pthread_join(thread, nil)
        sigaction(signal, &oldAction, nil)
    }
}

/// The calling thread's kernel id (from /proc/thread-self, which links to PID/task/TID).
func currentThreadID() -> Int32 {
    var buf = [CChar](repeating: 0, count: 64)
    let n = readlink("/proc/thread-self", &buf, 63)
    guard n > 0 else { return -1 }
    let link = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return Int32(link.split(separator: "/").last ?? "") ?? -1
}

/// Robustness against signals, leaks and impossible kernel values (in the serialized KVM suite).
extension KVMTests {
    @Test("KVM_CREATE_VM is retried after EINTR: 200 creations under a 100 µs signal storm all succeed")
    func createVMUnderSignals() throws {
        let kvm = try KVMSystem()
        let storm = SignalStorm(signal: SIGUSR2, target: pthread_self(), intervalMicroseconds: 20)
        var created: [any VMBackend] = []
        var failures: [String] = []
        for _ in 0..<200 {
            do { _ = try VirtualMachine(backend: kvm, configuration: VMConfiguration(memorySize: 64 << 20)); created.append(try kvm.createVM()) } catch { failures.append("\(error)") }
        }
        storm.stop()
        #expect(storm.sent.load(ordering: .relaxed) > 200, "signals were sent while creating")
        #expect(created.count == 200, "\(failures.prefix(3))")
    }

    @Test("a VM started, stopped and dropped without wait() releases its fds, kvm_run mappings and threads")
    func dropWithoutWait() throws {
        /// Open fds on /dev/kvm or KVM's anonymous inodes (kvm-vm, kvm-vcpu), and mappings of kvm-vcpu.
        func kvmResources() -> (fds: Int, mappings: Int) {
            var fds = 0
            if let d = opendir("/proc/self/fd") {
                while let e = readdir(d) {
                    let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                    var buf = [CChar](repeating: 0, count: 256)
                    let n = readlink("/proc/self/fd/" + name, &buf, 255)
                    if n > 0, String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self).contains("kvm") { fds += 1 }
                }
                closedir(d)
            }
            let maps = (try? ImageFile.read("/proc/self/maps")).map { String(decoding: $0, as: UTF8.self) } ?? ""
            return (fds, maps.split(separator: "\n").filter { $0.contains("kvm-vcpu") }.count)
        }
        let before = kvmResources()
        let vcpuThread = Atomic<Int32>(0)
        weak var weakVM: VirtualMachine?
        do {
            let g = try GuestRun("selftest", commandLine: "test=smp") { vm in
                vm.addExitHandler(ClosureExitHandler { exit, _ in
                    guard case .io(let io) = exit, io.port == 0x703 else { return .pass }
                    vcpuThread.store(currentThreadID(), ordering: .releasing)
                    return .handled
                })
            }
            try g.vm.start()
            var polls = 0
            while vcpuThread.load(ordering: .acquiring) == 0 && polls < 2000 { usleep(1000); polls += 1 }
            g.vm.stop()
            weakVM = g.vm
            let during = kvmResources()
            #expect(during.fds >= before.fds + 2 && during.mappings == before.mappings + 1, "the VM held a VM fd, a vCPU fd and its mapping")
        }
        let tid = vcpuThread.load(ordering: .acquiring)
        try #require(tid != 0, "the guest ran")
        // The vCPU and timer threads hold the VM until they leave; wait for that (bounded).
        var polls = 0
        while (weakVM != nil || access("/proc/self/task/\(tid)", F_OK) == 0) && polls < 2000 { usleep(5000); polls += 1 }
        #expect(weakVM == nil, "the VM was freed")
        #expect(access("/proc/self/task/\(tid)", F_OK) != 0, "its vCPU thread ended and was reclaimed")
        // The counts are process-wide: other suites may hold KVM fds for a moment, and VMs of earlier tests
        // may still be closing theirs when `before` was taken. A leak holds this VM's two fds and its mapping
        // for good, so wait (bounded) for the counts to come back to at most where they were.
        var after = kvmResources()
        polls = 0
        while (after.fds > before.fds || after.mappings > before.mappings) && polls < 400 {
            usleep(5000); polls += 1
            after = kvmResources()
        }
        #expect(after.fds <= before.fds && after.mappings <= before.mappings, "before \(before), after \(after)")
    }

    @Test("an exit reason above Int32.max (no kernel sends one) reads as no data instead of trapping")
    func hugeExitReason() throws {
        let kvm = try KVMSystem()
        let vm = try kvm.createVM()
        let vcpu = try #require(try vm.createVCPU(id: 0) as? KVMVCPU)
        // A second mapping of the same kvm_run page; exit_reason is the u32 at offset 8.
        let p = try #require(mmap(nil, kvm.vcpuMmapSize, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu.fd, 0))
        try #require(p != MAP_FAILED)
        defer { munmap(p, kvm.vcpuMmapSize) }
        p.storeBytes(of: UInt32(0xffff_fff0), toByteOffset: 8, as: UInt32.self)
        #expect(vcpu.exitData(at: 0) == 0)
        vcpu.setExitData(1, at: 0)
        vcpu.rejectMSRAccess()
        #expect(p.load(fromByteOffset: 8, as: UInt32.self) == 0xffff_fff0)
    }
}

/// A VM with the debug-exit port and `code` loaded as a flat long-mode binary at 0x100000.
func flatVM(_ code: [UInt8], configure: (inout VMConfiguration) -> Void = { _ in }) throws -> VirtualMachine {
    var c = VMConfiguration(memorySize: 64 << 20)
    configure(&c)
    let vm = try VirtualMachine(backend: try KVMSystem(), configuration: c)
    try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
    _ = try X86Boot.load(.flat(code), into: vm)
    return vm
}

/// `mov rax, imm32` (sign-extended).
func movRAX(_ v: UInt32) -> [UInt8] { [0x48, 0xc7, 0xc0] + withUnsafeBytes(of: v.littleEndian, Array.init) }
/// `mov dword [rax], imm32`.
func storeAtRAX(_ v: UInt32) -> [UInt8] { [0xc7, 0x00] + withUnsafeBytes(of: v.littleEndian, Array.init) }
/// `mov al, status; out 0xf4, al`.
func debugExit(_ status: UInt8) -> [UInt8] { [0xb0, status, 0xe6, 0xf4] }

/// vCPU state get/set and dirty logging against a running guest (in the serialized KVM suite).
extension KVMTests {
    @Test("the dirty log reports exactly the pages a running guest wrote, then starts clean")
    func dirtyLogOfRunningGuest() throws {
        let written: [UInt32] = [0x20_0000, 0x20_1000, 0x30_5008]
        var code: [UInt8] = []
        for (i, a) in written.enumerated() { code += movRAX(a) + storeAtRAX(0x1111_1111 &* UInt32(i + 1)) }
        code += debugExit(0)
        let vm = try flatVM(code) { $0.logDirtyPages = true }
        let pages = Set(written.map { UInt64($0) & ~0xfff })
        let before = Set(try vm.slots.dirtyPages().map(\.rawValue))
        #expect(before.isDisjoint(with: pages), "nothing written before the guest ran")
        #expect(try vm.run() == .guestExit(status: 0))
        let after = Set(try vm.slots.dirtyPages().map(\.rawValue))
        #expect(pages.isSubset(of: after), "the written pages are dirty: \(after.sorted().map { String($0, radix: 16) })")
        #expect(after.isDisjoint(with: [0x20_2000, 0x30_4000, 0x40_0000]), "untouched pages are clean")
        #expect(try vm.memory.read(UInt32.self, at: GuestAddress(0x30_5008)) == 0x3333_3333)
        let again = Set(try vm.slots.dirtyPages().map(\.rawValue))
        #expect(again.isDisjoint(with: pages), "getting the log cleared it")
        // The backend's bitmap covers the whole slot, whatever page count is asked for.
        let slot = try #require(vm.slots.slot(containing: GuestAddress(0x20_0000)))
        #expect(try vm.backend.dirtyLog(slot: slot.number, pageCount: 1).count == Int(slot.range.size / 4096 + 63) / 64)
        #expect(throws: BackendError.self) { _ = try vm.backend.dirtyLog(slot: 60_000, pageCount: 1) }
    }

    @Test("MSRs set from the host are what the guest's rdmsr reads; get returns what was set")
    func msrGetSet() throws {
        // mov ecx, 0xc0000102 (KERNEL_GS_BASE); rdmsr; out 0xf4, al
        let vm = try flatVM([0xb9, 0x02, 0x01, 0x00, 0xc0, 0x0f, 0x32, 0xe6, 0xf4])
        let cpu = vm.vcpus[0].backend
        try cpu.setMSRs([MSREntry(index: 0xc000_0102, value: 0xffff_8000_1234_565a), MSREntry(index: 0x174, value: 0x10)])
        #expect(try cpu.msrs([0xc000_0102, 0x174]) == [MSREntry(index: 0xc000_0102, value: 0xffff_8000_1234_565a), MSREntry(index: 0x174, value: 0x10)])
        #expect(try vm.run() == .guestExit(status: 0x5a))
        #expect(throws: BackendError.self) { try cpu.setMSRs([MSREntry(index: 0xdead_beef, value: 1)]) }
    }

    @Test("FPU and XSAVE state round-trip; XMM0 set through XSAVE is what the FPU view shows")
    func fpuAndXSAVE() throws {
        let vm = try flatVM(debugExit(0))
        let cpu = vm.vcpus[0].backend
        let pattern: [UInt8] = (0..<16).map { UInt8(0xa0 + $0) }
        // struct kvm_fpu: fpr[8][16], fcw at 128, fsw, ftwx, pad, last_opcode, last_ip, last_dp, xmm[16][16] at 152, mxcsr.
        var fpu = try cpu.fpu()
        #expect(fpu.bytes.count == 416)
        fpu.bytes.replaceSubrange(152..<168, with: pattern)
        fpu.bytes[128] = 0x7f; fpu.bytes[129] = 0x03   // FCW 0x37f
        try cpu.setFPU(fpu)
        let readBack = try cpu.fpu()
        #expect(Array(readBack.bytes[152..<168]) == pattern)
        #expect(readBack.bytes[128] == 0x7f && readBack.bytes[129] == 0x03)
        // kvm_xsave is the standard-format XSAVE area: the legacy FXSAVE region (XMM0 at byte 160),
        // then the header with XSTATE_BV at byte 512. KVM_SET_FPU does not mark SSE state in use,
        // so KVM_GET_XSAVE reports XMM in its init state (zeros) until XSTATE_BV says otherwise.
        var xsave = try cpu.xsave()
        #expect(xsave.bytes.count == 4096)
        let other: [UInt8] = pattern.reversed()
        xsave.bytes.replaceSubrange(160..<176, with: other)
        xsave.bytes[512] |= 0x3          // XSTATE_BV: x87 and SSE state present
        try cpu.setXSAVE(xsave)
        let x2 = try cpu.xsave()
        #expect(Array(x2.bytes[160..<176]) == other)
        #expect(x2.bytes[512] & 0x2 != 0, "SSE state in use")
        #expect(Array(try cpu.fpu().bytes[152..<168]) == other, "KVM_GET_FPU shows the XMM0 set through KVM_SET_XSAVE")
        #expect(throws: BackendError.self) { try cpu.setFPU(FPUState(bytes: [0])) }
    }

    @Test("LAPIC state round-trips (in-kernel irqchip): the task priority set is the one read")
    func lapicGetSet() throws {
        let vm = try flatVM(debugExit(0)) { $0.inKernelIRQChip = true }
        let cpu = vm.vcpus[0].backend
        var lapic = try cpu.lapic()
        #expect(lapic.bytes.count == 1024)
        #expect(lapic.bytes[0x30] & 0xff != 0, "the version register reads as a real APIC")
        lapic.bytes[0x80] = 0x20   // TPR
        try cpu.setLAPIC(lapic)
        #expect(try cpu.lapic().bytes[0x80] == 0x20)
        #expect(try vm.run() == .guestExit(status: 0))
    }

    @Test("vCPU events round-trip: an NMI mask set is the one read")
    func vcpuEventsGetSet() throws {
        let vm = try flatVM(debugExit(0))
        let cpu = vm.vcpus[0].backend
        var events = try cpu.vcpuEvents()
        #expect(events.bytes.count == 64)
        // struct kvm_vcpu_events: exception (8 bytes), interrupt (4), nmi { injected, pending, masked, pad } at 12.
        #expect(events.bytes[14] == 0)
        events.bytes[14] = 1
        try cpu.setVCPUEvents(events)
        #expect(try cpu.vcpuEvents().bytes[14] == 1)
        events.bytes[14] = 0
        try cpu.setVCPUEvents(events)
        #expect(try cpu.vcpuEvents().bytes[14] == 0)
    }

    @Test("an MMIO read exits with RIP on the load; after the handler, the guest sees the value and goes on")
    func mmioReadRIP() throws {
        let rips = Box<[UInt64]>([])
        let g = try GuestRun("selftest", commandLine: "test=mmioread") { vm in
            vm.addExitHandler(ClosureExitHandler { exit, ctx in
                guard case .mmio(let m) = exit, m.address == GuestAddress(0xc000_0000), m.direction == .read else {
                    if case .mmio = exit { return .handled }
                    return .pass
                }
                rips.value.append((try? ctx.registers().rip) ?? 0)
                ctx.completeRead(0x1122_3344)
                return .handled
            })
        }
        #expect(try g.run() == .guestExit(status: 0))
        #expect(g.console.text == "mmio=0x11223344\n")
        // test_mmioread: push %rbx (1 byte); mov $0xc0000000,%eax (5); mov (%rax),%ebx (2).
        let fn = try #require(try ELFImage(bytes: guestImage("selftest")).symbols.symbols.first { $0.name == "test_mmioread" })
        #expect(rips.value == [fn.address + 6], "RIP on `mov (%rax), %ebx` at the exit")
    }

    @Test("each workload gives the reference checksum of Guests/README.md", arguments: [
        ("uart-cpl0", 20, "0xa0787dcd"), ("uart-cpl3", 20, "0xa0787dcd"), ("uart-cpl3-pv", 20, "0xa0787dcd"),
        ("uart-cpl0-pv", 20, "0xa0787dcd"), ("doorbell-cpl3", 16, "0x187b11fc"), ("doorbell-cpl3-pv", 160, "0xce81ef52"),
    ])
    func referenceChecksums(name: String, iters: Int, checksum: String) throws {
        let g = try GuestRun(name, commandLine: "iters=\(iters)")
        #expect(try g.run() == .guestExit(status: 0))
        #expect(resultField(g.console.text, "checksum") == checksum, "\(g.console.text.suffix(160))")
        #expect(resultField(g.console.text, "iters") == String(iters))
    }
}

final class Box<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}

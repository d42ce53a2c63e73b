import Testing
import VMMKit
#if canImport(Glibc)
import Glibc
import Synchronization
#endif

/// Why KVM tests cannot run here, or nil when `/dev/kvm` opens.
let kvmUnavailable: String? = KVMSystem.unavailableReason()
let kvmSkipReason = Comment(rawValue: "needs /dev/kvm: \(kvmUnavailable ?? "")")

/// The repository's `Guests/` directory.
let guestsDirectory: String = {
    var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
    parts.removeLast(3) // Tests/KVMTests/KVMTests.swift
    return parts.joined(separator: "/") + "/Guests"
}()

func guestImage(_ name: String) throws -> [UInt8] {
    try ImageFile.read(guestsDirectory + "/" + name + ".elf")
}

/// A VM with the standard devices and a captured console.
struct GuestRun {
    let vm: VirtualMachine
    let devices: StandardDevices
    let console = CapturedOutput()

    init(_ image: String, commandLine: String = "", cpus: Int = 1, memory: UInt64 = 64 << 20,
         extra: [(range: GuestRange, readOnly: Bool)] = [], ringPolling: PVRingPolling = .enabled(),
         setup: (VirtualMachine) throws -> Void = { _ in }) throws {
        var c = VMConfiguration(memorySize: memory, vcpuCount: cpus)
        c.extraRegions = extra
        vm = try VirtualMachine(backend: try KVMSystem(), configuration: c)
        devices = try StandardDevices.install(on: vm, console: console.sink(), ringPolling: ringPolling)
        try setup(vm)
        _ = try X86Boot.load(.elf(try guestImage(image)), commandLine: commandLine, into: vm)
    }

    func run() throws -> StopReason { try vm.run() }
}

/// Extracts `key=value` from a RESULT line.
func resultField(_ text: String, _ key: String) -> String? {
    guard let line = text.split(whereSeparator: \.isNewline).first(where: { $0.hasPrefix("RESULT ") }) else { return nil }
    for word in line.split(separator: " ") where word.hasPrefix(key + "=") { return String(word.dropFirst(key.count + 1)) }
    return nil
}

/// Records accesses; the bus calls devices from every vCPU thread at once, so the records are locked.
final class Recorder: BusDevice, @unchecked Sendable {
    let name = "recorder"
    let value: UInt64
    private let state = Mutex<(writes: [(UInt64, Int, UInt64)], reads: Int)>(([], 0))
    var writes: [(UInt64, Int, UInt64)] { state.withLock { $0.writes } }
    var reads: Int { state.withLock { $0.reads } }
    init(value: UInt64 = 0) { self.value = value }
    func read(offset: UInt64, size: Int) -> UInt64 {
        let n = state.withLock { s in s.reads += 1; return s.reads }
        return value &+ UInt64(n - 1)
    }
    func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect {
        state.withLock { $0.writes.append((offset, size, value)) }
        return .none
    }
}

final class StringExits: @unchecked Sendable {
    var ports: Set<UInt16> = []
    func record(_ io: PortIO) { ports.insert(io.port) }
}

@Suite("Real KVM", .serialized, .enabled(if: kvmUnavailable == nil, kvmSkipReason))
struct KVMTests {
    @Test("hello prints its line and exits with the status from its command line")
    func hello() throws {
        let g = try GuestRun("hello", commandLine: "exit=42")
        #expect(try g.run() == .guestExit(status: 42))
        #expect(g.console.text == "Hello from the VMMKit hello guest!\n")
    }

    @Test("each workload and its static-PV twin give the same checksum", arguments: [
        ("uart-cpl0", "iters=12"), ("uart-cpl3", "iters=12"), ("doorbell-cpl3", "iters=64"),
    ])
    func workloadTwins(name: String, args: String) throws {
        let plain = try GuestRun(name, commandLine: args)
        #expect(try plain.run() == .guestExit(status: 0))
        // A poller that never idles: the synchronous doorbell ring is used from the first request.
        let pv = try GuestRun(name + "-pv", commandLine: args, ringPolling: .enabled(idleNanoseconds: 60_000_000_000))
        #expect(try pv.run() == .guestExit(status: 0))
        let a = resultField(plain.console.text, "checksum"), b = resultField(pv.console.text, "checksum")
        #expect(a != nil && a == b, "\(plain.console.text.suffix(120)) vs \(pv.console.text.suffix(120))")
        #expect(resultField(pv.console.text, "workload") == name + "-pv")
        // The twin's console lines are the same bytes, delivered through the ring.
        let lines = { (t: String) in t.split(separator: "\n").filter { !$0.hasPrefix("RESULT") } }
        #expect(lines(plain.console.text) == lines(pv.console.text))
        if name.hasPrefix("uart") { #expect(pv.devices.rings.consumed[0] > 0) } else { #expect(pv.devices.rings.consumed[1] > 0) }
        // The PV twin exits far less.
        #expect(pv.vm.statistics().total < plain.vm.statistics().total)
    }

    @Test("the static-PV twins give the reference checksums of Guests/README.md, with and without the polling consumer, and with one that sleeps after 1 µs idle (the guests kick it awake)", arguments: [
        ("uart-cpl0-pv", "iters=20", "0xa0787dcd"), ("uart-cpl3-pv", "iters=200", "0x1472f3a9"),
        ("doorbell-cpl3-pv", "iters=160", "0xce81ef52"),
    ], ["poller", "none", "sleepy poller"])
    func pvTwinChecksums(twin: (String, String, String), poller: String) throws {
        let (name, args, checksum) = twin
        let polling = poller != "none"
        let mode: PVRingPolling = switch poller {
        case "poller": .enabled(idleNanoseconds: 60_000_000_000)
        case "sleepy poller": .enabled(idleNanoseconds: 1_000)
        default: .disabled
        }
        let g = try GuestRun(name, commandLine: args, ringPolling: mode)
        #expect(try g.run() == .guestExit(status: 0))
        #expect(resultField(g.console.text, "checksum") == checksum, "\(g.console.text.suffix(200))")
        let doorbell = name.hasPrefix("doorbell")
        // The doorbell twin appends to its synchronous ring with ring_post (it
        // reads completions only after the exiting STATUS read), so it uses
        // the ring with and without a poller; every request went through it.
        let stats = g.devices.rings.statistics(ring: doorbell ? 1 : 0)
        #expect(stats.consumed > 0)
        if doorbell { #expect(stats.consumed == 160) }
        #expect(stats.holes == 0 && stats.invalidHints == 0)
        if polling { #expect(g.devices.rings.pollerCPUNanoseconds > 0) }
    }

    @Test("string I/O with count > 1 in both directions")
    func stringIO() throws {
        let source = Recorder(value: 0x30)
        let strings = StringExits()
        let g = try GuestRun("selftest", commandLine: "test=strio") { vm in
            try vm.bus.attach(source, ports: 0x702..<0x703)
            vm.addExitHandler(ClosureExitHandler { exit, _ in
                if case .io(let io) = exit, io.count > 1 { strings.record(io) }
                return .pass
            })
        }
        #expect(try g.run() == .guestExit(status: 0))
        #expect(g.console.text == "STRINGIO\ninsb=3031323334353637\n")
        #expect(source.reads == 8)
        // KVM may split `rep outsb` into single-element exits (it does on this host); `rep insb` arrives batched.
        #expect(strings.ports.contains(0x702), "a string exit with count > 1 was seen: \(strings.ports)")
    }

    @Test("an MMIO read returns the device's value; the MMIO write carries the guest's")
    func mmioRead() throws {
        let dev = Recorder(value: 0x1234_5678)
        let g = try GuestRun("selftest", commandLine: "test=mmioread") { vm in
            try vm.bus.attach(dev, mmio: GuestRange(start: GuestAddress(0xc000_0000), size: 0x1000))
        }
        #expect(try g.run() == .guestExit(status: 0))
        #expect(g.console.text == "mmio=0x12345678\n")
        #expect(dev.writes.count == 1 && dev.writes[0].0 == 4 && dev.writes[0].2 == 0x1234_5679)
    }

    @Test("a write to a read-only memslot exits as an MMIO write; reads come from memory")
    func readOnlySlot() throws {
        let dev = Recorder()
        let ro = GuestRange(start: GuestAddress(0xb000_0000), size: 0x1000)
        let g = try GuestRun("selftest", commandLine: "test=rowrite", extra: [(ro, true)]) { vm in
            try vm.bus.attach(dev, mmio: ro)
            try vm.memory.write(UInt32(0x0bad_cafe), at: ro.start)
        }
        #expect(try g.run() == .guestExit(status: 0))
        #expect(dev.writes.count == 1 && dev.writes[0].2 == 0xdead_beef && dev.writes[0].1 == 4)
        #expect(dev.reads == 0, "reads of a read-only slot do not exit")
        #expect(g.console.text == "ro=0x0badcafe\n", "the write did not reach memory")
    }

    @Test("a triple fault is reported with registers, not hung on")
    func tripleFault() throws {
        let g = try GuestRun("selftest", commandLine: "test=triple")
        #expect {
            try g.run()
        } throws: { e in
            guard case VMError.guestFault(let f) = e else { return false }
            return f.kind == .tripleFault && f.registers != nil
        }
    }

    @Test("stop() ends a spinning guest within a second")
    func stopSpinning() throws {
        let g = try GuestRun("selftest", commandLine: "test=spin")
        try g.vm.start()
        usleep(100_000)
        var t0 = timespec(), t1 = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t0)
        g.vm.stop()
        #expect(try g.vm.wait() == .stopped)
        clock_gettime(CLOCK_MONOTONIC, &t1)
        let ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1_000_000
        #expect(ms < 1000, "stop took \(ms) ms")
    }

    @Test("two vCPUs run, pauseAll() returns, and nothing runs until resumeAll()")
    func twoVCPUs() throws {
        let counter = Recorder()
        let g = try GuestRun("selftest", commandLine: "test=smp", cpus: 2) { vm in try vm.bus.attach(counter, ports: 0x703..<0x704) }
        try g.vm.start()
        var waited = 0
        func seen() -> Set<UInt64> { g.vm.pauseAll(); defer { g.vm.resumeAll() }; return Set(counter.writes.map(\.2)) }
        while seen() != [0, 1] && waited < 200 { usleep(10_000); waited += 1 }
        g.vm.pauseAll()
        #expect(Set(counter.writes.map(\.2)) == [0, 1], "both vCPUs wrote their APIC ID")
        let n = counter.writes.count
        usleep(50_000)
        #expect(counter.writes.count == n, "no exits while paused")
        g.vm.resumeAll()
        usleep(50_000)
        g.vm.stop()
        #expect(try g.vm.wait() == .stopped)
        #expect(counter.writes.count > n, "running again after resume")
    }

    @Test("a flat binary enters in long mode; coalesced PIO writes reach the device in order")
    func flatAndCoalesced() throws {
        // mov al, 0x41; out 0x704, al (x3 with al+1); mov al, 5; out 0xf4, al
        let code: [UInt8] = [
            0x66, 0xba, 0x04, 0x07,             // mov dx, 0x704
            0xb0, 0x41, 0xee,                   // mov al, 'A'; out dx, al
            0xb0, 0x42, 0xee,                   // mov al, 'B'; out dx, al
            0xb0, 0x43, 0xee,                   // mov al, 'C'; out dx, al
            0xb0, 0x05, 0xe6, 0xf4,             // mov al, 5; out 0xf4, al
        ]
        let dev = Recorder()
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        try vm.bus.attach(dev, ports: 0x704..<0x705)
        try vm.registerCoalescedZone(CoalescedZone(address: 0x704, size: 1, isPIO: true))
        _ = try X86Boot.load(.flat(code), into: vm)
        #expect(try vm.run() == .guestExit(status: 5))
        #expect(dev.writes.map(\.2) == [0x41, 0x42, 0x43])
        #expect(vm.statistics()[.io] == 1, "only the debug-exit write exited")
    }

    @Test("malformed images are refused with a typed error before anything runs", arguments: [
        [UInt8](), [0x7f, 0x45, 0x4c], [0x7f, 0x45, 0x4c, 0x46] + [UInt8](repeating: 0, count: 60),
    ])
    func malformed(bytes: [UInt8]) throws {
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
        #expect(throws: VMError.self) { _ = try X86Boot.load(.elf(bytes), into: vm) }
    }
}

final class MSRLog: @unchecked Sendable {
    var reads: [UInt32] = []
    var writes: [(UInt32, UInt64)] = []
}

/// User-space MSR exits (in the serialized KVM suite).
extension KVMTests {
    // mov ecx, 0x12345678; rdmsr; mov ebx, eax; mov eax, 7; xor edx, edx; wrmsr; mov eax, ebx; out 0xf4, al
    static let msrCode: [UInt8] = [0xb9, 0x78, 0x56, 0x34, 0x12, 0x0f, 0x32, 0x89, 0xc3, 0xb8, 0x07, 0x00, 0x00, 0x00,
                                0x31, 0xd2, 0x0f, 0x30, 0x89, 0xd8, 0xe6, 0xf4]

    func makeMSRVM() throws -> VirtualMachine {
        var c = VMConfiguration(memorySize: 64 << 20)
        c.userSpaceMSRExits = true
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: c)
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        _ = try X86Boot.load(.flat(KVMTests.msrCode), into: vm)
        return vm
    }

    @Test("accesses to an unknown MSR reach a handler, which supplies the value read")
    func msrHandled() throws {
        let vm = try makeMSRVM()
        let log = MSRLog()
        vm.addExitHandler(ClosureExitHandler { exit, ctx in
            switch exit {
            case .msrRead(let i): log.reads.append(i); ctx.completeRead(42); return .handled
            case .msrWrite(let i, let v): log.writes.append((i, v)); return .handled
            default: return .pass
            }
        })
        #expect(try vm.run() == .guestExit(status: 42))
        #expect(log.reads == [0x1234_5678])
        #expect(log.writes.count == 1 && log.writes[0].0 == 0x1234_5678 && log.writes[0].1 == 7)
    }

    @Test("an MSR access no handler takes gets #GP (here: a triple fault, the guest has no IDT)")
    func msrRejected() throws {
        let vm = try makeMSRVM()
        #expect {
            try vm.run()
        } throws: { e in
            guard case VMError.guestFault(let f) = e else { return false }
            return f.kind == .tripleFault
        }
        #expect(vm.statistics()[.msr] == 1)
    }
}

/// Stopping right after an MMIO read (in the serialized KVM suite).
extension KVMTests {
    @Test("a VM stopped by the handler of an MMIO read still completes it: the register holds the value, RIP is past the load")
    func stopCompletesMMIORead() throws {
        let g = try GuestRun("selftest", commandLine: "test=mmioread") { vm in
            vm.addExitHandler(ClosureExitHandler { exit, ctx in
                guard case .mmio(let m) = exit, m.address == GuestAddress(0xc000_0000), m.direction == .read else { return .pass }
                ctx.completeRead(0x1122_3344)
                return .stopVM(.stopped)
            })
        }
        #expect(try g.run() == .stopped)
        let r = try g.vm.vcpus[0].registers()
        #expect(r.rbx & 0xffff_ffff == 0x1122_3344, "selftest loads with `mov (%rax), %ebx`")
        // test_mmioread: push %rbx (1 byte); mov $0xc0000000,%eax (5); mov (%rax),%ebx (2).
        let fn = try #require(try ELFImage(bytes: guestImage("selftest")).symbols.symbols.first { $0.name == "test_mmioread" })
        #expect(r.rip == fn.address + 8, "RIP past the load")
    }
}

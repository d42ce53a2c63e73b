import DMP
import Synchronization
import Testing
import VMMKit
import X86Disassembler

/// A tiny long-mode guest built with DMP's own assembler: it loads known values
/// into every general-purpose register, RFLAGS and the red zone, runs fast-path
/// bodies, stores every register, RFLAGS and the red zone's ends at
/// ``FastPathGuest/results`` and exits through the debug-exit port. At CPL0 it
/// runs emulated on our machines (~1 µs per instruction), so the guests stay
/// short; with `userMode` a small kernel preamble drops to CPL3 (IOPL 3, its own
/// GDT and user-accessible identity tables), where the bodies run natively.
struct FastPathGuest {
    static let code: UInt64 = 0x10_0000
    static let data: UInt64 = 0x20_0000
    static let results: UInt64 = 0x21_0000
    static let ring: UInt64 = 0x22_0000
    /// The implant: stubs and their data (reserved in the memory map, ordinary RAM).
    static let implantCode: UInt64 = X86Layout.implantArea.start.rawValue
    static let implantData: UInt64 = X86Layout.implantArea.start.rawValue + 0x1000
    /// The registers the guest sets, in ``X86Register/gpr64`` order (rsp is left to the platform).
    static let initial: [UInt64] = (0..<16).map { 0x0101_0101_0101_0101 &* UInt64($0 + 1) ^ 0x8000_0000_0000_0000 }
    /// Status flags the guest sets before the bodies run: CF, PF, ZF, SF, OF (and the reserved bit 1).
    static let flags: UInt64 = 0x8c7
    static let statusMask: UInt64 = 0x8d5

    /// Where user-mode code starts (after the kernel preamble) and its stack.
    static let userEntry: UInt64 = code + 0x100
    static let userStack: UInt64 = 0x28_0000
    /// Identity tables with the user bit (4 GiB of 2 MiB pages), a GDT with user segments, its pseudo-descriptor.
    static let userTables: UInt64 = 0x30_0000
    static let userGDT: UInt64 = 0x30_6000
    static let userGDTR: UInt64 = 0x30_6100
    /// A TSS whose I/O bitmap allows every port: KVM PVM checks it when it emulates IN/OUT at CPL3
    /// (it does not keep the guest's user IOPL), as Guests/include/boot.inc notes.
    static let userTSS: UInt64 = 0x30_8000
    /// Red-zone sentinels the guest writes at [rsp - 8] and [rsp - 128] before the bodies.
    static let redZone: [UInt64] = [0x5ed2_0e00_0000_0008, 0x5ed2_0e00_0000_0080]

    var a = X86Assembler(origin: code)
    /// Whether the bodies run at CPL3.
    let userMode: Bool

    /// A guest whose bodies run at CPL0, or at CPL3 after a kernel preamble.
    init(userMode: Bool = false) throws {
        self.userMode = userMode
        guard userMode else { return }
        let lgdt = FastPathGuest.userGDTR &- (a.position + 7)
        a.raw([0x0f, 0x01, 0x15] + withUnsafeBytes(of: UInt32(truncatingIfNeeded: lgdt).littleEndian, Array.init)) // lgdt [rip -> gdtr]
        try a.mov(.rax, immediate: FastPathGuest.userTables)
        a.raw([0x0f, 0x22, 0xd8])                                                     // mov cr3, rax
        try a.mov(.eax, immediate: 0x28)
        a.raw([0x0f, 0x00, 0xd8])                                                     // ltr ax
        for v in [0x1b, FastPathGuest.userStack, 0x3002, 0x23, FastPathGuest.userEntry] as [UInt64] {
            try a.mov(.rax, immediate: v)                                             // ss, rsp, rflags (IOPL 3), cs, rip
            try a.push(.rax)
        }
        a.raw([0x48, 0xcf])                                                           // iretq
        a.nop(Int(FastPathGuest.userEntry - a.position))
    }

    /// Loads ``initial`` into every register but rsp, `overrides` replacing some, then the flags.
    mutating func prologue(_ overrides: [X86Register: UInt64] = [:]) throws {
        for (n, r) in X86Register.gpr64.enumerated() where r != .rsp {
            try a.mov(r, immediate: overrides[r] ?? FastPathGuest.initial[n])
        }
        try a.mov(.rax, immediate: FastPathGuest.flags)
        try a.push(.rax)
        a.popfq()                                             // from here on only mov: the flags stay
        try a.mov(.rax, immediate: FastPathGuest.redZone[0])
        try a.mov(.init(base: .rsp, displacement: -8), .rax)
        try a.mov(.rax, immediate: FastPathGuest.redZone[1])
        try a.mov(.init(base: .rsp, displacement: -128), .rax)
        try a.mov(.at(FastPathGuest.results + 160), .rsp)
        try a.mov(.rax, immediate: overrides[.rax] ?? FastPathGuest.initial[0])
    }

    /// Stores every register, then RFLAGS, at ``results`` and exits with status 0.
    mutating func epilogue() throws {
        for (n, r) in X86Register.gpr64.enumerated() { try a.mov(.at(FastPathGuest.results + 8 * UInt64(n)), r) }
        try a.mov(.rax, .init(base: .rsp, displacement: -8))  // the red zone, before pushfq writes it
        try a.mov(.at(FastPathGuest.results + 136), .rax)
        try a.mov(.rax, .init(base: .rsp, displacement: -128))
        try a.mov(.at(FastPathGuest.results + 144), .rax)
        a.pushfq()
        try a.pop(.rax)
        try a.mov(.at(FastPathGuest.results + 128), .rax)
        try a.mov(.al, immediate: 0)
        try a.outPort(width: 1, port: 0xf4)
    }

    /// The body for `bytes` (decoded as if at the current position) serving `routes`.
    mutating func body(_ bytes: [UInt8], _ routes: [FastPathRoute], preserveFlags: Bool = true, lahf: Bool = false) throws {
        let i = try X86Disassembler().decode(bytes, address: a.position)
        try FastPathEmitter.emitBody(for: i, routes: routes, preserveFlags: preserveFlags, lahf: lahf, into: &a)
    }

    /// Runs the guest on a VM that `setup` prepares once the code is loaded; returns the VM after the guest's exit.
    /// `debugExit: false` when `setup` installs the standard devices (which have it).
    func run(debugExit: Bool = true, setup: (VirtualMachine) throws -> Void = { _ in }) throws -> VirtualMachine {
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
        if debugExit { try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8) }
        _ = try X86Boot.load(.flat(try a.finish(), loadAddress: FastPathGuest.code), into: vm)
        if userMode { try FastPathGuest.writeUserTables(vm.memory) }
        try setup(vm)
        #expect(try vm.run() == .guestExit(status: 0))
        return vm
    }

    /// The user-mode page tables, TSS and GDT (null, kernel code 0x08, kernel data 0x10, user data 0x1b, user code 0x23, TSS 0x28).
    static func writeUserTables(_ m: GuestMemory) throws {
        let pdpt = userTables + 0x1000
        try m.write(pdpt | 7, at: GuestAddress(userTables))
        for g in 0..<UInt64(4) {
            let pd = pdpt + 0x1000 * (g + 1)
            try m.write(pd | 7, at: GuestAddress(pdpt + 8 * g))
            for j in 0..<UInt64(512) { try m.write((g << 30 | j << 21) | 0x87, at: GuestAddress(pd + 8 * j)) }
        }
        let limit: UInt64 = 104 + 8192                           // the header, the bitmap, the all-ones byte
        try m.fill(0, at: GuestAddress(userTSS), count: Int(limit))
        try m.write(UInt16(104), at: GuestAddress(userTSS + 102))
        try m.write(UInt8(0xff), at: GuestAddress(userTSS + limit))
        let tss = (limit & 0xffff) | (userTSS & 0xff_ffff) << 16 | 0x89 << 40 | (limit >> 16) << 48 | (userTSS >> 24 & 0xff) << 56
        let gdt: [UInt64] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00cf_f300_0000_ffff, 0x00af_fb00_0000_ffff,
                             tss, userTSS >> 32]
        for (k, e) in gdt.enumerated() { try m.write(e, at: GuestAddress(userGDT + 8 * UInt64(k))) }
        try m.write(UInt16(8 * gdt.count - 1), at: GuestAddress(userGDTR))
        try m.write(userGDT, at: GuestAddress(userGDTR + 2))
    }

    /// Writes an empty ring's header and free slots at `ring.base` (no consumer: the test reads the words).
    static func writeEmptyRing(_ ring: RingMapping, width: UInt32, _ m: GuestMemory) throws {
        try m.write(PVRingLayout.magic, at: GuestAddress(ring.base + PVRingLayout.magicOffset))
        try m.write(ring.slotCount, at: GuestAddress(ring.base + PVRingLayout.slotCountOffset))
        try m.write(width, at: GuestAddress(ring.base + PVRingLayout.widthOffset))
        for k in 0..<UInt64(ring.slotCount) {
            try m.write(PVRingLayout.slotWord(sequence: UInt32(k), value: 0), at: GuestAddress(ring.base + PVRingLayout.slotsOffset + 8 * k))
        }
    }

    static func register(_ vm: VirtualMachine, _ r: X86Register) throws -> UInt64 {
        let n = X86Register.gpr64.firstIndex(of: r.architectural) ?? 0
        return try vm.memory.read(UInt64.self, at: GuestAddress(results + 8 * UInt64(n)))
    }

    static func flags(_ vm: VirtualMachine) throws -> UInt64 { try vm.memory.read(UInt64.self, at: GuestAddress(results + 128)) }

    /// Every register but `except` and rsp holds its initial value (or its override), and the status flags are the ones set.
    static func untouched(_ vm: VirtualMachine, except: Set<X86Register>, overrides: [X86Register: UInt64] = [:],
                          flags checkFlags: Bool = true) throws -> Bool {
        var ok = try !checkFlags || flags(vm) & statusMask == FastPathGuest.flags & statusMask
        // The red zone and RSP are as they were.
        ok = try ok && vm.memory.read(UInt64.self, at: GuestAddress(results + 136)) == redZone[0]
        ok = try ok && vm.memory.read(UInt64.self, at: GuestAddress(results + 144)) == redZone[1]
        ok = try ok && register(vm, .rsp) == vm.memory.read(UInt64.self, at: GuestAddress(results + 160))
        for (n, r) in X86Register.gpr64.enumerated() where r != .rsp && !except.contains(r) {
            ok = try ok && register(vm, r) == overrides[r] ?? initial[n]
        }
        return ok
    }

    /// A guest that writes `text` with `out dx, al` (dx = `rdx`), each through a body serving a UART ring append on `ring`.
    /// `delay`: iterations of a `dec ecx; jnz` loop after each byte (a slow writer).
    static func uartWriter(_ text: String, rdx: UInt64, ring: RingMapping, data: UInt64 = data,
                           userMode: Bool = false, lahf: Bool = false, delay: UInt32 = 0) throws -> (FastPathGuest, FastPathRoute) {
        let route = FastPathGuest.route(.port(0x3f8), width: 1, .write, .ringAppend(ring: 0, mode: .asynchronous), ring: ring, in: data)
        var g = try FastPathGuest(userMode: userMode)
        try g.prologue([.rdx: rdx])
        for c in text.utf8 {
            try g.a.mov(.al, immediate: UInt64(c))
            try g.body([0xee], [route], lahf: lahf)
            guard delay > 0 else { continue }
            try g.a.mov(.ecx, immediate: UInt64(delay))
            let spin = g.a.newLabel()
            try g.a.bind(spin)
            try g.a.dec(.ecx)
            try g.a.jcc(.ne, .label(spin))
        }
        try g.epilogue()
        return (g, route)
    }

    static func route(_ target: FastPathRoute.Target, width: Int, _ direction: AccessDirection, _ kind: FastPathKind,
                      ring: RingMapping? = nil, in base: UInt64 = data) -> FastPathRoute {
        FastPathRoute(target: target, width: width, direction: direction, kind: kind,
                      enableWord: base + 0x100, hitCounter: base + 0x108, ring: ring, slot: base + 0x110)
    }
}

/// Executing DMP's fast-path bodies in a real guest (in the serialized KVM suite).
extension KVMTests {
    @Test("a constant read (in al, dx) sets al only, leaves every other register, the flags and the red zone; a clear enable word or another port exits, at CPL0 and CPL3", arguments: [
        (UInt32(1), UInt16(0x3fd), UInt64(0x60), 1, 0),   // served: al = the constant
        (UInt32(0), UInt16(0x3fd), UInt64(0x42), 0, 1),   // enable clear: the device answers
        (UInt32(1), UInt16(0x3fe), UInt64(0x42), 0, 1),   // another port: the device answers
    ] as [(UInt32, UInt16, UInt64, Int, Int)], [false, true])
    func constantReadRuns(c: (UInt32, UInt16, UInt64, Int, Int), userMode: Bool) throws {
        let (enable, port, al, hits, deviceReads) = c
        var g = try FastPathGuest(userMode: userMode)
        let rdx: UInt64 = 0xaaaa_0000_0000_0000 | UInt64(port)
        try g.prologue([.rdx: rdx])
        try g.body([0xec], [FastPathGuest.route(.port(0x3fd), width: 1, .read, .constantRead(0x1_0060))])
        try g.epilogue()
        let device = Recorder(value: 0x42)
        let vm = try g.run { vm in
            try vm.bus.attach(device, ports: 0x3fd..<0x3ff)
            try vm.memory.write(enable, at: GuestAddress(FastPathGuest.data + 0x100))
        }
        #expect(try FastPathGuest.register(vm, .rax) == FastPathGuest.initial[0] & ~0xff | al)
        #expect(try FastPathGuest.untouched(vm, except: [.rax], overrides: [.rdx: rdx]))
        #expect(try vm.memory.read(UInt64.self, at: GuestAddress(FastPathGuest.data + 0x108)) == UInt64(hits))
        #expect(device.reads == deviceReads)
        #expect(try vm.memory.read(UInt32.self, at: GuestAddress(FastPathGuest.data + 0x100)) == enable, "the body never writes its enable word")
    }

    @Test("ring appends land in the ring with their values and sequences; on a full ring nobody polls, the original out exits (CPL0 and CPL3; flags kept by pushfq or lahf)",
          arguments: [false, true], [false, true])
    func ringAppendRuns(userMode: Bool, lahf: Bool) throws {
        let ring = RingMapping(base: FastPathGuest.ring, slotCount: 4, synchronous: false)
        let (g, _) = try FastPathGuest.uartWriter("ABCDE", rdx: 0x5555_0000_0000_03f8, ring: ring, userMode: userMode, lahf: lahf)
        let device = Recorder()
        let vm = try g.run { vm in
            try vm.bus.attach(device, ports: 0x3f8..<0x3f9)
            try vm.memory.write(UInt32(1), at: GuestAddress(FastPathGuest.data + 0x100))
            try FastPathGuest.writeEmptyRing(ring, width: 1, vm.memory)
        }
        let words = try (0..<UInt64(4)).map { k in try vm.memory.read(UInt64.self, at: GuestAddress(ring.base + PVRingLayout.slotsOffset + 8 * k)) }
        #expect(words == zip(1...4, "ABCD".utf8).map { PVRingLayout.slotWord(sequence: UInt32($0), value: UInt32($1)) })
        #expect(try vm.memory.read(UInt64.self, at: GuestAddress(ring.base + PVRingLayout.hintOffset)) == 4)
        #expect(try vm.memory.read(UInt64.self, at: GuestAddress(FastPathGuest.data + 0x108)) == 4)
        #expect(device.writes.map(\.2) == [UInt64(UInt8(ascii: "E"))], "the fifth append found the ring full and exited")
        #expect(try FastPathGuest.register(vm, .rax) == FastPathGuest.initial[0] & ~0xff | UInt64(UInt8(ascii: "E")))
        #expect(try FastPathGuest.untouched(vm, except: [.rax], overrides: [.rdx: 0x5555_0000_0000_03f8]))
    }

    @Test("a read not independent of pending ring entries is served while the ring is empty and exits once an entry is pending",
          arguments: [false, true])
    func pendingRingRuns(userMode: Bool) throws {
        let ring = RingMapping(base: FastPathGuest.ring, slotCount: 4, synchronous: false)
        let lsr = FastPathGuest.route(.port(0x3fd), width: 1, .read, .constantRead(0x60))
        var gated = lsr
        gated.pendingRings = [ring]
        let thr = FastPathGuest.route(.port(0x3f8), width: 1, .write, .ringAppend(ring: 0, mode: .asynchronous), ring: ring,
                                      in: FastPathGuest.data + 0x200)
        var g = try FastPathGuest(userMode: userMode)
        try g.prologue([.rdx: 0x3fd])
        try g.body([0xec], [gated])                                  // empty ring: served
        try g.a.mov(.at(FastPathGuest.data + 0x500), .al)
        try g.a.mov(.edx, immediate: 0x3f8)
        try g.a.mov(.al, immediate: 0x41)
        try g.body([0xee], [thr])                                    // one entry pending (nobody consumes this ring)
        try g.a.mov(.edx, immediate: 0x3fd)
        try g.body([0xec], [gated])                                  // pending: the original in exits
        try g.epilogue()
        let device = Recorder(value: 0x42)
        let vm = try g.run { vm in
            try vm.bus.attach(device, ports: 0x3fd..<0x3fe)
            for r in [lsr, thr] { try vm.memory.write(UInt32(1), at: GuestAddress(r.enableWord)) }
            try FastPathGuest.writeEmptyRing(ring, width: 1, vm.memory)
        }
        #expect(try vm.memory.read(UInt8.self, at: GuestAddress(FastPathGuest.data + 0x500)) == 0x60)
        #expect(try FastPathGuest.register(vm, .rax) & 0xff == 0x42 && device.reads == 1)
        #expect(try vm.memory.read(UInt64.self, at: GuestAddress(lsr.hitCounter)) == 1)
        #expect(try vm.memory.read(UInt64.self, at: GuestAddress(ring.base + PVRingLayout.slotsOffset))
                == PVRingLayout.slotWord(sequence: 1, value: 0x41))
        #expect(try FastPathGuest.untouched(vm, except: [.rax, .rdx]))
    }

    @Test("bodies appending to the platform's UART ring reach the console through VMMKit's consumer, in order (CPL0 and CPL3)",
          arguments: [false, true])
    func ringToConsole(userMode: Bool) throws {
        let ring = RingMapping(base: X86Layout.ringArea.start.rawValue, slotCount: 512, synchronous: false)
        let (g, route) = try FastPathGuest.uartWriter("DMP\n", rdx: 0x3f8, ring: ring, data: FastPathGuest.implantData, userMode: userMode)
        let console = CapturedOutput()
        var rings: PVRingDevice?
        let vm = try g.run(debugExit: false) { vm in
            rings = try StandardDevices.install(on: vm, console: console.sink(), ringPolling: .disabled).rings
            try vm.memory.write(UInt32(1), at: GuestAddress(route.enableWord))
        }
        #expect(console.text == "DMP\n")
        #expect(rings?.consumed[0] == 4)
        #expect(try vm.memory.read(UInt64.self, at: GuestAddress(route.hitCounter)) == 4)
        #expect(try FastPathGuest.untouched(vm, except: [.rax], overrides: [.rdx: 0x3f8]))
    }

    @Test("a slow writer at CPL3 whose appends find the poller asleep wakes it (the original out before publishing, the kick port after); the output is complete and in order",
          arguments: [true, false])
    func ringAppendWakesSleepingPoller(kickPort: Bool) throws {
        let ring = RingMapping(base: X86Layout.ringArea.start.rawValue, slotCount: 512, synchronous: false,
                               kick: kickPort ? .port(StandardDevices.ringKickPort) : nil)
        let text = "sleepy poller\n"
        // Milliseconds between bytes: the poller (1 µs idle) goes to sleep before each next byte.
        let (g, route) = try FastPathGuest.uartWriter(text, rdx: 0x3f8, ring: ring, data: FastPathGuest.implantData,
                                                      userMode: true, lahf: true, delay: 25_000_000)
        let console = CapturedOutput()
        let wakes = Mutex<(kicks: Int, originals: Int)>((0, 0))
        var rings: PVRingDevice?
        let vm = try g.run(debugExit: false) { vm in
            vm.addExitHandler(ClosureExitHandler { (exit, _) throws(VMError) -> ExitResult in
                if case .io(let io) = exit, io.direction == .write {
                    if io.port == StandardDevices.ringKickPort { wakes.withLock { $0.kicks += 1 } }
                    if io.port == 0x3f8 { wakes.withLock { $0.originals += 1 } }
                }
                return .pass
            })
            rings = try StandardDevices.install(on: vm, console: console.sink(), ringPolling: .enabled(idleNanoseconds: 1_000)).rings
            try vm.memory.write(UInt32(1), at: GuestAddress(route.enableWord))
        }
        let (kicks, originals) = wakes.withLock { ($0.kicks, $0.originals) }
        let hits = try vm.memory.read(UInt64.self, at: GuestAddress(route.hitCounter))
        #expect(console.text == text)
        #expect(Int(hits) + originals == text.utf8.count, "every byte either appended or written by the original out")
        #expect(rings?.consumed[0] == Int(hits))
        #expect(kicks + originals > 0, "nothing woke the sleeping poller")
        if !kickPort { #expect(kicks == 0) }
        #expect(rings.map { $0.statistics(ring: 0).consumed } == Int(hits))
    }

    @Test("an instruction stub in the implant serves an MMIO load at a register-based address and jumps back; disabled, the load exits",
          arguments: [true, false], [false, true])
    func instructionStubRuns(enabled: Bool, userMode: Bool) throws {
        let mmio: UInt64 = 0xc000_0000
        var g = try FastPathGuest(userMode: userMode)
        try g.prologue([.rsi: mmio - 0x100])
        let site = g.a.position
        let load: [UInt8] = [0x8b, 0x86, 0x04, 0x01, 0x00, 0x00] // mov eax, [rsi + 0x104]
        g.a.raw(load)
        try g.epilogue()
        let i = try X86Disassembler().decode(load, address: site)
        let route = FastPathGuest.route(.memory(mmio + 4), width: 4, .read, .constantRead(0xdead_beef), in: FastPathGuest.implantData)
        let (stub, _) = try FastPathEmitter.instructionStub(for: i, routes: [route], at: FastPathGuest.implantCode)
        let patch = try FastPathEmitter.siteJump(replacing: i, to: FastPathGuest.implantCode)
        let device = Recorder(value: 7)
        let vm = try g.run { vm in
            try vm.bus.attach(device, mmio: GuestRange(start: GuestAddress(mmio), size: 0x1000))
            try vm.memory.write(stub, at: GuestAddress(FastPathGuest.implantCode))
            try vm.memory.write(patch, at: GuestAddress(site))
            try vm.memory.write(UInt32(enabled ? 1 : 0), at: GuestAddress(route.enableWord))
        }
        #expect(try FastPathGuest.register(vm, .rax) == (enabled ? 0xdead_beef : 7), "a 32-bit load clears bits 63:32")
        #expect(try FastPathGuest.untouched(vm, except: [.rax], overrides: [.rsi: mmio - 0x100]))
        #expect(device.reads == (enabled ? 0 : 1))
        #expect(try vm.memory.read(UInt64.self, at: GuestAddress(route.hitCounter)) == (enabled ? 1 : 0))
    }

    @Test("synchronous ring appends (doorbell) make their completion visible before the body returns; with nobody polling the store exits instead",
          arguments: [true, false], [false, true])
    func synchronousRingRuns(polling: Bool, userMode: Bool) throws {
        let doorbell = StandardDevices.doorbellBase, queue: UInt64 = 0x23_0000
        let ring = RingMapping(base: X86Layout.ringArea.start.rawValue + PVRingLayout.defaultStride, slotCount: 512,
                               synchronous: true, kick: .port(StandardDevices.ringKickPort))
        let route = FastPathGuest.route(.memory(doorbell + DoorbellDevice.doorbellOffset), width: 4, .write,
                                        .ringAppend(ring: 1, mode: .synchronous), ring: ring, in: FastPathGuest.implantData)
        var g = try FastPathGuest(userMode: userMode)
        try g.prologue([.rsi: doorbell])
        try g.a.mov(.init(base: .rsi, displacement: 0x08), width: 4, immediate: Int64(queue))
        try g.a.mov(.init(base: .rsi, displacement: 0x10), width: 4, immediate: 4)
        try g.a.mov(.init(base: .rsi, displacement: 0x14), width: 4, immediate: 1)
        for k in 0..<UInt64(3) {
            try g.a.mov(.eax, immediate: 0x100 + k)
            try g.body([0x89, 0x46, 0x40], [route])                  // mov [rsi + 0x40], eax
            try g.a.mov(.ecx, .at(queue + 8 * k))                    // the completion, read at once
            try g.a.mov(.at(FastPathGuest.results + 0x200 + 4 * k), .ecx)
        }
        try g.epilogue()
        var devices: StandardDevices?
        let vm = try g.run(debugExit: false) { vm in
            devices = try StandardDevices.install(on: vm, console: CapturedOutput().sink(),
                                                  ringPolling: polling ? .enabled(idleNanoseconds: 60_000_000_000) : .disabled)
            try vm.memory.write(UInt32(1), at: GuestAddress(route.enableWord))
        }
        let seen = try (0..<UInt64(3)).map { k in try vm.memory.read(UInt32.self, at: GuestAddress(FastPathGuest.results + 0x200 + 4 * k)) }
        #expect(seen == (0..<UInt32(3)).map { (0x100 + $0) ^ 0x5a5a_5a5a })
        #expect(devices?.doorbell.completions == 3)
        let served = try vm.memory.read(UInt64.self, at: GuestAddress(route.hitCounter))
        if polling { #expect(served > 0 && devices?.rings.consumed[1] == Int(served)) } else { #expect(served == 0 && devices?.rings.consumed[1] == 0) }
        #expect(try FastPathGuest.untouched(vm, except: [.rax, .rcx], overrides: [.rsi: doorbell]))
    }

    @Test("rsp-based loads (the address computed below the pushes): a 64-bit constant and a sign-extended shared slot; with and without pushfq/popfq",
          arguments: [true, false], [false, true])
    func stackOperandRuns(preserveFlags: Bool, userMode: Bool) throws {
        let rsp = userMode ? FastPathGuest.userStack : X86Layout.initialStack
        let constant = FastPathGuest.route(.memory(rsp + 8), width: 8, .read, .constantRead(0x1122_3344_5566_7788))
        let slot = FastPathGuest.route(.memory(rsp + 16), width: 2, .read, .sharedSlotRead(slot: 0), in: FastPathGuest.data + 0x200)
        var g = try FastPathGuest(userMode: userMode)
        try g.prologue()
        try g.body([0x48, 0x8b, 0x44, 0x24, 0x08], [constant], preserveFlags: preserveFlags)       // mov rax, [rsp + 8]
        try g.body([0x48, 0x0f, 0xbf, 0x4c, 0x24, 0x10], [slot], preserveFlags: preserveFlags)   // movsx rcx, word [rsp + 16]
        try g.epilogue()
        let vm = try g.run { vm in
            for r in [constant, slot] { try vm.memory.write(UInt32(1), at: GuestAddress(r.enableWord)) }
            try vm.memory.write(UInt16(0x8001), at: GuestAddress(slot.slot ?? 0))
            try vm.memory.write(UInt64(0xaaaa), at: GuestAddress(rsp + 8))      // what the original loads would see
            try vm.memory.write(UInt64(0xbbbb), at: GuestAddress(rsp + 16))
        }
        #expect(try FastPathGuest.register(vm, .rax) == 0x1122_3344_5566_7788)
        #expect(try FastPathGuest.register(vm, .rcx) == 0xffff_ffff_ffff_8001)
        #expect(try FastPathGuest.untouched(vm, except: [.rax, .rcx], flags: preserveFlags))
        for r in [constant, slot] { #expect(try vm.memory.read(UInt64.self, at: GuestAddress(r.hitCounter)) == 1) }
    }

    @Test("TSC counters: a 24-bit PM timer by in eax, dx and a 64-bit counter by mov rax, [rsi] with a shift past 64, between two rdtsc",
          arguments: [false, true])
    func tscCounterRuns(userMode: Bool) throws {
        let pm = TSCCounter(multiplier: 3, shift: 1, offset: 1000, wrapMask: 0xffff_ffff_ffff)   // 1.5 × tsc + 1000
        let wide = TSCCounter(multiplier: 0xc000_0000_0000_0000, shift: 66, offset: 1 << 40)    // (tsc × 3/16) + 2^40
        let mmio: UInt64 = 0xfed0_0000
        let timer = FastPathGuest.route(.port(0x608), width: 4, .read, .tscCounter(pm))
        let counter = FastPathGuest.route(.memory(mmio + 0xf0), width: 8, .read, .tscCounter(wide), in: FastPathGuest.data + 0x200)
        var g = try FastPathGuest(userMode: userMode)
        try g.prologue([.rdx: 0x608, .rsi: mmio])
        let stamps = FastPathGuest.data + 0x400, keep = FastPathGuest.data + 0x480
        func stamp(_ k: UInt64) throws {                             // rdtsc without the stack (the red zone is checked)
            try g.a.mov(.at(keep), .rax)
            try g.a.mov(.at(keep + 8), .rdx)
            g.a.rdtsc()
            try g.a.mov(.at(stamps + 8 * k), .eax)
            try g.a.mov(.at(stamps + 8 * k + 4), .edx)
            try g.a.mov(.rax, .at(keep))
            try g.a.mov(.rdx, .at(keep + 8))
        }
        try stamp(0)
        try g.body([0xed], [timer])                                  // in eax, dx
        try g.a.mov(.at(stamps + 0x20), .rax)
        try g.body([0x48, 0x8b, 0x86, 0xf0, 0x00, 0x00, 0x00], [counter]) // mov rax, [rsi + 0xf0]
        try stamp(1)
        try g.epilogue()
        let vm = try g.run { vm in
            for r in [timer, counter] { try vm.memory.write(UInt32(1), at: GuestAddress(r.enableWord)) }
        }
        let before = try vm.memory.read(UInt64.self, at: GuestAddress(stamps))
        let after = try vm.memory.read(UInt64.self, at: GuestAddress(stamps + 8))
        let timerValue = try vm.memory.read(UInt64.self, at: GuestAddress(stamps + 0x20))
        #expect(before < after)
        #expect(timerValue >> 32 == 0, "in eax clears bits 63:32")
        #expect((pm.value(tsc: before) & 0xffff_ffff...pm.value(tsc: after) & 0xffff_ffff).contains(timerValue), "\(before) \(after) \(timerValue)")
        #expect((wide.value(tsc: before)...wide.value(tsc: after)).contains(try FastPathGuest.register(vm, .rax)))
        #expect(try FastPathGuest.untouched(vm, except: [.rax], overrides: [.rdx: 0x608, .rsi: mmio]))
        for r in [timer, counter] { #expect(try vm.memory.read(UInt64.self, at: GuestAddress(r.hitCounter)) == 1) }
    }
}

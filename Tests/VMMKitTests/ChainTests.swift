import Testing
import VMMKit
import VMMKitTesting

@Suite("Exit chain")
struct ChainTests {
    @Test("handlers run in order; a consuming handler stops the chain")
    func orderAndConsume() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        let log = OrderLog()
        vm.addExitHandler(ProbeHandler("a", .pass, log))
        vm.addExitHandler(ProbeHandler("b", .handled, log))
        vm.addExitHandler(ProbeHandler("c", .handled, log))
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        mock.vcpu(0)?.script([out(0x80, 1)])
        #expect(try vm.run() == .halted)   // script exhausted: the mock halts
        #expect(log.names == ["a", "b"])
        #expect(mock.finish().isEmpty)
    }

    @Test("passed exits reach the bus; the debug-exit port stops the VM with its value")
    func passReachesBus() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        let log = OrderLog()
        vm.addExitHandler(ProbeHandler("a", .pass, log))
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        mock.vcpu(0)?.script([debugExit3, out(0x80, 9)])
        #expect(try vm.run() == .guestExit(status: 3))
        #expect(log.names == ["a"])
        let left = mock.finish()
        #expect(left.steps[0]?.count == 1, "the step after the debug exit is never run")
    }

    @Test("forward() runs the rest of the chain and returns its result")
    func forward() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        let log = OrderLog()
        final class Seen: @unchecked Sendable { var results: [ExitResult] = [] }
        let seen = Seen()
        vm.addExitHandler(ClosureExitHandler { exit, ctx throws(VMError) in
            log.append("outer-before")
            let r = try ctx.forward(exit)
            seen.results.append(r)
            log.append("outer-after")
            return r
        })
        vm.addExitHandler(ProbeHandler("inner", .pass, log))
        let dev = RecordingDevice()
        try vm.bus.attach(dev, ports: 0x80..<0x81)
        mock.vcpu(0)?.script([out(0x80, 7)])
        _ = try vm.run()
        // Two exits: the scripted OUT, then the HLT the mock returns when its script is done.
        #expect(log.names == ["outer-before", "inner", "outer-after", "outer-before", "outer-after"])
        #expect(seen.results == [.handled, .stopVCPU])
        #expect(dev.writes.count == 1 && dev.writes[0].value == 7, "the bus ran exactly once")
    }

    @Test("a handler that declares its exit kinds is skipped for other kinds, as if it had passed")
    func exitKindsSkip() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        final class Kinds: ExitHandler, @unchecked Sendable {
            var seen: [ExitKind] = []
            var exitKinds: Set<ExitKind>? { [.mmio] }
            func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
                seen.append(exit.kind)
                return .pass
            }
        }
        final class All: ExitHandler, @unchecked Sendable {
            var seen: [ExitKind] = []
            func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
                seen.append(exit.kind)
                return .pass
            }
        }
        let kinds = Kinds(), all = All()
        vm.addExitHandler(kinds)
        vm.addExitHandler(all)
        let dev = RecordingDevice()
        try vm.bus.attach(dev, ports: 0x80..<0x81)
        mock.vcpu(0)?.script([
            out(0x80, 1),
            .exit(.mmio(MMIOAccess(address: GuestAddress(0xd000_0000), size: 4, direction: .write, value: 5))),
            out(0x80, 2),
        ])
        #expect(try vm.run() == .halted)
        #expect(kinds.seen == [.mmio], "called for the MMIO exit only")
        #expect(all.seen == [.io, .mmio, .io, .halt], "the handler after it still sees every exit")
        #expect(dev.writes.map(\.value) == [1, 2], "skipped port writes still reach the bus")
    }

    @Test("an unknown exit is a typed error, not a crash")
    func unsupportedExit() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        mock.vcpu(0)?.script([.exit(.unsupported(reason: 999))])
        #expect {
            try vm.run()
        } throws: { e in
            guard case VMError.unhandledExit(let v, let exit, _) = e else { return false }
            return v == 0 && exit == .unsupported(reason: 999)
        }
    }

    @Test("a triple fault is reported with the vCPU's registers")
    func tripleFault() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        var regs = Registers()
        regs.rip = 0x1234
        mock.vcpu(0)?.currentRegisters = regs
        mock.vcpu(0)?.script([.exit(.shutdown)])
        #expect {
            try vm.run()
        } throws: { e in
            guard case VMError.guestFault(let f) = e else { return false }
            return f.kind == .tripleFault && f.registers?.rip == 0x1234 && f.vcpu == 0
        }
    }

    @Test("an emulation failure is a typed guest fault")
    func emulationFailure() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        mock.vcpu(0)?.script([.exit(.internalError(InternalError(suberror: 1, data: [0xdead])))])
        #expect {
            try vm.run()
        } throws: { e in
            guard case VMError.guestFault(let f) = e else { return false }
            return f.kind == .emulationFailure && f.data == [0xdead]
        }
    }

    @Test("statistics count exits per kind and per site")
    func statistics() throws {
        let mock = MockHypervisor()
        var c = VMConfiguration(memorySize: 4 << 20)
        c.collectSiteStatistics = true
        let vm = try VirtualMachine(backend: mock, configuration: c)
        try vm.bus.attach(RecordingDevice(), ports: 0x80..<0x81)
        var r = Registers(); r.rip = 0x5000
        mock.vcpu(0)?.currentRegisters = r
        mock.vcpu(0)?.script([out(0x80, 1), out(0x80, 2), .fail(.interrupted), out(0x81, 3)])
        _ = try vm.run()
        let s = vm.statistics()
        #expect(s[.io] == 3)
        #expect(s[.interrupted] == 1)
        #expect(s[.halt] == 1)
        #expect(s.sites[ExitSite(rip: 0x5000, kind: .io, address: 0x80, size: 1, direction: .write)] == 2)
        #expect(vm.bus.unclaimedCounts[UnclaimedAccess(space: .pio, address: 0x81, direction: .write)] == 1)
    }
}

@Suite("Restart")
struct RestartTests {
    @Test("after wait() returns, start() runs the vCPUs again from where they stopped")
    func restart() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        mock.vcpu(0)?.script([debugExit3])
        #expect(try vm.run() == .guestExit(status: 3))
        #expect(throws: VMError.self) { _ = try vm.wait() }   // not started
        mock.vcpu(0)?.script([out(0xf4, 4)])
        #expect(try vm.run() == .guestExit(status: 4))
        #expect(vm.statistics()[.io] == 1, "statistics restart with each run")
        #expect(mock.finish().isEmpty)
    }
}

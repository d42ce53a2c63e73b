import Testing
import Synchronization
import VMMKit
import VMMKitTesting
#if canImport(Glibc)
import Glibc
#endif

final class Box<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}

@Suite("Chain and lifecycle robustness")
struct LifecycleTests {
    @Test("a second forward() from the same handler runs nothing and returns the first result")
    func forwardTwice() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        let log = OrderLog()
        let results = Box<[ExitResult]>([])
        vm.addExitHandler(ClosureExitHandler { exit, ctx throws(VMError) in
            guard case .io = exit else { return .pass }
            let first = try ctx.forward(exit)
            let second = try ctx.forward(exit)
            results.value += [first, second]
            return second
        })
        vm.addExitHandler(ProbeHandler("consumer", .handled, log))
        vm.addExitHandler(ProbeHandler("after", .handled, log))
        let dev = RecordingDevice()
        try vm.bus.attach(dev, ports: 0x80..<0x81)
        mock.vcpu(0)?.script([out(0x80, 7), out(0x80, 8)])
        #expect(try vm.run() == .halted)
        #expect(log.names == ["consumer", "consumer"], "each exit handled once, never by the handler after the consumer")
        #expect(results.value == [.handled, .handled, .handled, .handled])
        #expect(dev.writes.isEmpty, "the bus never saw the consumed exits")
    }

    @Test("a handler that forwarded ends the chain with its own result, even .pass")
    func forwardThenPass() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        let log = OrderLog()
        vm.addExitHandler(ClosureExitHandler { exit, ctx throws(VMError) in
            guard case .io = exit else { return .pass }
            _ = try ctx.forward(exit)
            return .pass
        })
        vm.addExitHandler(ProbeHandler("consumer", .handled, log))
        vm.addExitHandler(ProbeHandler("after", .handled, log))
        mock.vcpu(0)?.script([out(0x80, 7)])
        #expect {
            try vm.run()
        } throws: { e in
            guard case VMError.unhandledExit = e else { return false }
            return true
        }
        #expect(log.names == ["consumer"])
    }

    @Test("nested forwards: each level's second call returns its own first result")
    func nestedForward() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        let log = OrderLog()
        let outer = Box<[ExitResult]>([])
        vm.addExitHandler(ClosureExitHandler { exit, ctx throws(VMError) in
            guard case .io = exit else { return .pass }
            outer.value.append(try ctx.forward(exit))
            outer.value.append(try ctx.forward(exit))
            return .handled
        })
        vm.addExitHandler(ClosureExitHandler { exit, ctx throws(VMError) in
            guard case .io = exit else { return .pass }
            _ = try ctx.forward(exit)
            _ = try ctx.forward(exit)
            return .stopVM(.stopped)   // what the outer level sees
        })
        vm.addExitHandler(ProbeHandler("consumer", .handled, log))
        mock.vcpu(0)?.script([out(0x80, 1)])
        #expect(try vm.run() == .halted)
        #expect(log.names == ["consumer"])
        #expect(outer.value == [.stopVM(.stopped), .stopVM(.stopped)])
    }

    @Test("wait() from an exit handler is a typed error, not a deadlock")
    func waitFromHandler() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        let seen = Box<String?>(nil)
        vm.addExitHandler(ClosureExitHandler { exit, ctx throws(VMError) in
            guard case .io = exit else { return .pass }
            do throws(VMError) { _ = try ctx.vm.wait(); seen.value = "returned" } catch { seen.value = error.description }
            return .stopVM(.stopped)
        })
        mock.vcpu(0)?.script([out(0x80, 1)])
        #expect(try vm.run() == .stopped)
        #expect(seen.value?.contains("wait() from an exit handler") == true, "\(seen.value ?? "nil")")
    }

    @Test("a string I/O exit with more elements than KVM's data page holds is a typed error, not a busy vCPU",
          arguments: [(UInt32.max, UInt8(1)), (4097, 1), (2049, 2), (1025, 4)])
    func hugeStringIO(count: UInt32, size: UInt8) throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        let dev = RecordingDevice()
        try vm.bus.attach(dev, ports: 0x80..<0x81)
        mock.vcpu(0)?.script([.exit(.io(PortIO(port: 0x80, size: size, count: count, direction: .read, value: 0)))])
        #expect {
            try vm.run()
        } throws: { e in
            guard case VMError.invalidState(let s) = e else { return false }
            return s.contains("data page")
        }
        #expect(dev.reads.isEmpty)
    }

    @Test("the largest string I/O KVM reports (one page) is served element by element")
    func pageOfStringIO() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        let dev = RecordingDevice(readValue: 0x10)
        try vm.bus.attach(dev, ports: 0x80..<0x81)
        mock.vcpu(0)?.script([.exit(.io(PortIO(port: 0x80, size: 4, count: 1024, direction: .read, value: 0)))])
        #expect(try vm.run() == .halted)
        #expect(dev.reads.count == 1024)
        let completed = try #require(mock.vcpu(0)?.completedReads.first)
        #expect(completed.count == 1024 && completed[1023] == 0x10)
    }

    @Test("the mock consumes a long script step by step (100,000 steps), and leaves the rest in order")
    func longScript() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        let dev = RecordingDevice()
        try vm.bus.attach(dev, ports: 0x80..<0x81)
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        let v = try #require(mock.vcpu(0))
        v.script((0..<100_000).map { out(0x80, UInt64($0)) } + [debugExit3] + (0..<3).map { out(0x80, UInt64($0)) })
        #expect(try vm.run() == .guestExit(status: 3))
        #expect(dev.writes.count == 100_000)
        #expect(dev.writes.enumerated().allSatisfy { $0.element.value == UInt64($0.offset) })
        #expect(v.remainingSteps.map(\.description) == (0..<3).map { out(0x80, UInt64($0)).description })
    }

    @Test("a VM started, stopped and dropped without wait() is freed with its vCPU threads")
    func dropWithoutWait() throws {
        weak var weakVM: VirtualMachine?
        weak var weakMemory: GuestMemory?
        do {
            let mock = MockHypervisor()
            let vm = try makeVM(mock)
            vm.addPeriodicTask(every: 1_000_000) { _ throws(VMError) in nil }   // a timer thread too
            mock.vcpu(0)?.script([.spin])
            try vm.start()
            vm.stop()
            weakVM = vm
            weakMemory = vm.memory
        }
        // The vCPU and timer threads hold the VM until they leave; wait for that (bounded).
        var polls = 0
        while weakVM != nil && polls < 2000 { usleep(5000); polls += 1 }
        #expect(weakVM == nil, "the VM was freed")
        #expect(weakMemory == nil, "its guest memory too")
    }
}

@Suite("Retrying interrupted calls")
struct InterruptedCallTests {
    @Test("EINTR is retried up to the bound; other errors and success pass through at once")
    func retries() throws {
        var calls = 0
        let v = try InterruptedCall.retrying(5) { () throws(BackendError) -> Int in
            calls += 1
            if calls < 4 { throw BackendError("KVM_CREATE_VM", errno: .interrupted) }
            return 42
        }
        #expect(v == 42 && calls == 4)
        calls = 0
        #expect(throws: BackendError("KVM_CREATE_VM", errno: .interrupted)) {
            try InterruptedCall.retrying(2) { () throws(BackendError) -> Int in calls += 1; throw BackendError("KVM_CREATE_VM", errno: .interrupted) }
        }
        #expect(calls == 3, "the first call and two retries")
        calls = 0
        #expect(throws: BackendError("KVM_CREATE_VM", errno: .outOfMemory)) {
            try InterruptedCall.retrying(9) { () throws(BackendError) -> Int in calls += 1; throw BackendError("KVM_CREATE_VM", errno: .outOfMemory) }
        }
        #expect(calls == 1)
    }
}

@Suite("Host CPU pinning")
struct HostCPUPinningTests {
    @Test("VMConfiguration.hostCPUs pins the vCPU and timer threads to the CPU given; the starting thread keeps its own affinity")
    func pinsThreads() throws {
        let allowed = VirtualMachine.allowedHostCPUs
        let cpu = try #require(allowed.last, "the host reported no CPU affinity")
        let mock = MockHypervisor()
        var c = VMConfiguration(memorySize: 4 << 20, vcpuCount: 2)
        c.hostCPUs = [cpu]
        let vm = try VirtualMachine(backend: mock, configuration: c)
        let seen = Mutex<[[Int]]>([])
        vm.addExitHandler(ClosureExitHandler { exit, _ in
            guard case .io = exit else { return .pass }
            seen.withLock { $0.append(VirtualMachine.allowedHostCPUs) }
            return .handled
        })
        let timer = Mutex<[Int]?>(nil)
        vm.addPeriodicTask(every: 100_000) { _ throws(VMError) in
            timer.withLock { if $0 == nil { $0 = VirtualMachine.allowedHostCPUs } }
            return nil
        }
        mock.vcpu(0)?.script([out(0x80, 1)])
        mock.vcpu(1)?.script([out(0x80, 2)])
        #expect(try vm.run() == .halted)
        #expect(seen.withLock { $0 } == [[cpu], [cpu]])
        #expect(timer.withLock { $0 } == nil || timer.withLock { $0 } == [cpu])
        #expect(VirtualMachine.allowedHostCPUs == allowed, "the thread that started the VM is not left pinned")
    }

    @Test("a host CPU the host refuses: start throws invalidConfiguration and nothing runs")
    func refusedCPU() throws {
        let mock = MockHypervisor()
        var c = VMConfiguration(memorySize: 4 << 20)
        c.hostCPUs = [1 << 20]
        let vm = try VirtualMachine(backend: mock, configuration: c)
        mock.vcpu(0)?.script([out(0x80, 1)])
        #expect {
            try vm.run()
        } throws: { e in
            guard case VMError.invalidConfiguration(let why) = e else { return false }
            return why.contains("sched_setaffinity")
        }
        #expect(!vm.isRunning)
    }
}

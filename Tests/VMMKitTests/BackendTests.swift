import Dispatch
import Testing
import VMMKit
import VMMKitTesting
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

@Suite("Backend errors and the run loop")
struct BackendTests {
    @Test("errno values map to named error kinds", arguments: [
        (Errno.interrupted, BackendError.Kind.interrupted, "EINTR"),
        (Errno.tryAgain, .tryAgain, "EAGAIN"),
        (Errno.badAddress, .badAddress, "EFAULT"),
        (Errno.outOfMemory, .outOfMemory, "ENOMEM"),
        (Errno.noSuchFile, .unavailable, "ENOENT"),
        (Errno.permissionDenied, .permissionDenied, "EACCES"),
        (Errno.invalidArgument, .invalidArgument, "EINVAL"),
        (Errno.notTTY, .unsupported, "ENOTTY"),
        (Errno(rawValue: 1234), .other, "errno 1234"),
    ])
    func errnoMapping(errno: Errno, kind: BackendError.Kind, name: String) {
        let e = BackendError("KVM_RUN", errno: errno)
        #expect(e.kind == kind)
        #expect(e.errno.name == name)
        #expect(e.description.hasPrefix("KVM_RUN failed: \(name)"))
    }

    @Test("a missing /dev/kvm gives a typed error that says so")
    func missingDevice() {
        #expect {
            _ = try KVMSystem(path: "/nonexistent/kvm")
        } throws: { e in
            guard let b = e as? BackendError else { return false }
            return b.kind == .unavailable && b.operation == "open /nonexistent/kvm" && b.description.contains("missing")
        }
    }

    @Test("an injected ENOMEM on KVM_CREATE_VCPU fails VM creation, naming the ioctl")
    func injectedCreateVCPU() {
        let mock = MockHypervisor()
        mock.log.inject(.outOfMemory, into: .createVCPU)
        #expect {
            _ = try makeVM(mock)
        } throws: { e in
            guard case VMError.backend(let b) = e else { return false }
            return b.operation == "KVM_CREATE_VCPU" && b.errno == .outOfMemory
        }
        #expect(mock.finish().isEmpty)
    }

    @Test("EINTR from KVM_RUN is not an error: the loop runs on")
    func eintr() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        mock.vcpu(0)?.script([.fail(.interrupted), .fail(.interrupted), debugExit3])
        #expect(try vm.run() == .guestExit(status: 3))
        #expect(vm.statistics()[.interrupted] == 2)
        #expect(mock.finish().isEmpty)
    }

    @Test("EFAULT and EAGAIN from KVM_RUN stop the VM with the ioctl and errno", arguments: [Errno.badAddress, .tryAgain])
    func runFailure(errno: Errno) throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        mock.log.inject(errno, into: .run)
        #expect {
            try vm.run()
        } throws: { e in
            guard case VMError.backend(let b) = e else { return false }
            return b.operation == "KVM_RUN" && b.errno == errno
        }
    }

    @Test("finish() reports unconsumed steps and undelivered errors")
    func finishReportsLeftovers() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        mock.vcpu(0)?.script([debugExit3, out(0x80, 1), .exit(.halt)])
        mock.log.inject(.badAddress, into: .getFPU)
        _ = try vm.run()
        let left = mock.finish()
        #expect(!left.isEmpty)
        #expect(left.steps[0]?.count == 2)
        #expect(left.failures[.getFPU] == [.badAddress])
    }

    @Test("the call log records ioctls in order")
    func callLog() throws {
        let mock = MockHypervisor()
        _ = try makeVM(mock, vcpus: 2)
        let ops = mock.log.calls.map(\.operation)
        #expect(ops.first == .createVM)
        #expect(ops.filter { $0 == .createVCPU }.count == 2)
        #expect(ops.firstIndex(of: .setUserMemoryRegion)! < ops.firstIndex(of: .createVCPU)!)
    }

    @Test("pauseAll() returns with every vCPU parked, resumeAll() and stop() end the run")
    func pauseAll() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock, vcpus: 3)
        for i in 0..<3 { mock.vcpu(i)?.script([.spin, .spin, .spin, .spin]) }
        try vm.start()
        vm.pauseAll()
        // Paused: no vCPU enters the guest until resumed.
        let runsWhilePaused = (0..<3).map { mock.vcpu($0)?.runCount ?? -1 }
        usleep(50_000)
        #expect((0..<3).map { mock.vcpu($0)?.runCount ?? -1 } == runsWhilePaused)
        vm.resumeAll()
        // Resumed: each vCPU enters the guest again.
        var waited = 0
        while (0..<3).contains(where: { (mock.vcpu($0)?.runCount ?? 0) <= runsWhilePaused[$0] }) && waited < 2000 {
            usleep(1000); waited += 1
        }
        for i in 0..<3 { #expect(mock.vcpu(i)!.runCount > runsWhilePaused[i], "vCPU \(i) ran again after resume") }
        vm.pauseAll()
        let remaining = (0..<3).map { mock.vcpu($0)!.remainingSteps.count }
        usleep(20_000)
        #expect((0..<3).map { mock.vcpu($0)!.remainingSteps.count } == remaining, "nothing runs while paused")
        vm.resumeAll()
        vm.stop()
        #expect(try vm.wait() == .stopped)
    }

    @Test("stop() ends a spinning vCPU")
    func stopSpinning() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        mock.vcpu(0)?.script([.spin])
        try vm.start()
        vm.stop()
        #expect(try vm.wait() == .stopped)
    }
}

@Suite("Review regressions")
struct ReviewRegressionTests {
    final class PauseFromHandler: ExitHandler, @unchecked Sendable {
        private let m = Mutex<[Bool]>([])
        var results: [Bool] { m.withLock { $0 } }
        func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
            guard case .io(let io) = exit, io.port == 0x90 else { return .pass }
            let ok = context.vm.pauseAll()
            m.withLock { $0.append(ok) }
            if ok { context.vm.resumeAll() }
            return .handled
        }
    }

    @Test("pauseAll() from a vCPU's own exit handler returns (that vCPU counts as paused)")
    func pauseFromHandler() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock, vcpus: 2)
        let h = PauseFromHandler()
        vm.addExitHandler(h)
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        mock.vcpu(0)?.script([out(0x90, 1), out(0x90, 2), debugExit3])
        mock.vcpu(1)?.script([.spin, .spin, .spin, .spin, .spin])
        #expect(try vm.run() == .guestExit(status: 3))
        #expect(h.results == [true, true])
    }

    @Test("nested pauses need as many resumes; pauseAll() on a stopped VM returns false")
    func nestedPause() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        #expect(vm.pauseAll() == false)
        mock.vcpu(0)?.script(Array(repeating: .spin, count: 10))
        try vm.start()
        #expect(vm.pauseAll())
        #expect(vm.pauseAll())
        let runs = mock.vcpu(0)!.runCount
        vm.resumeAll()
        usleep(30_000)
        #expect(mock.vcpu(0)!.runCount == runs, "still paused after one of two resumes")
        vm.resumeAll()
        var waited = 0
        while mock.vcpu(0)!.runCount == runs && waited < 1000 { usleep(1000); waited += 1 }
        #expect(mock.vcpu(0)!.runCount > runs)
        vm.stop()
        #expect(try vm.wait() == .stopped)
    }

    @Test("resumeAll() from a thread that does not hold the pause does nothing")
    func strayResume() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        mock.vcpu(0)?.script(Array(repeating: .spin, count: 10))
        try vm.start()
        #expect(vm.pauseAll())
        let runs = mock.vcpu(0)!.runCount
        let done = DispatchSemaphore(value: 0)
        DispatchQueue.global().async { vm.resumeAll(); done.signal() }
        done.wait()
        usleep(30_000)
        #expect(mock.vcpu(0)!.runCount == runs, "still paused after another thread's resume")
        vm.resumeAll()
        var waited = 0
        while mock.vcpu(0)!.runCount == runs && waited < 1000 { usleep(1000); waited += 1 }
        #expect(mock.vcpu(0)!.runCount > runs, "the holder's resume lets it run")
        vm.stop()
        #expect(try vm.wait() == .stopped)
    }

    @Test("a stop after a handled exit completes it with an immediate-exit KVM_RUN")
    func stopCompletesAccess() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        mock.vcpu(0)?.script([debugExit3])
        _ = try vm.run()
        let runs = mock.log.calls(.run).count
        #expect(runs == 2, "the exit's KVM_RUN and the completing one")
        #expect(mock.vcpu(0)?.completedReads.count == 1)
    }

    @Test("the unclaimed-address table is bounded")
    func unclaimedBounded() {
        let bus = IOBus()
        for a in 0..<UInt64(IOBus.unclaimedAddressLimit + 100) { _ = bus.read(.mmio, address: 0x1000_0000 + a * 8, size: 4) }
        #expect(bus.unclaimedCounts.count == IOBus.unclaimedAddressLimit)
        #expect(bus.unclaimedOverflow == 100)
    }

    @Test("UART input beyond the FIFO is dropped and reported as an overrun")
    func uartOverrun() {
        let u = UART8250(sink: CapturedOutput().sink())
        u.receive(Array(repeating: 0x41, count: 40))
        #expect(u.read(offset: 5, size: 1) & 0x03 == 0x03, "data ready and overrun")
        #expect(u.read(offset: 5, size: 1) & 0x02 == 0, "overrun clears on read")
        var n = 0
        while u.read(offset: 5, size: 1) & 1 == 1 { _ = u.read(offset: 0, size: 1); n += 1 }
        #expect(n == UART8250.fifoDepth)
    }

    @Test("more vCPUs than the boot stacks allow are refused, not corrupting memory")
    func tooManyVCPUs() throws {
        let vm = try makeVM(MockHypervisor(), vcpus: X86Layout.maximumLongModeVCPUs + 1, memory: 32 << 20)
        #expect(throws: VMError.self) { _ = try X86Boot.load(.flat([0xf4]), into: vm) }
    }

    @Test("device DMA into a read-only region is refused")
    func dmaReadOnly() throws {
        let m = try GuestMemory(ranges: [(GuestRange(start: GuestAddress(0), size: 0x1000), true)])
        #expect(throws: GuestMemoryError.readOnly(GuestAddress(0x10))) { try m.dmaWrite(UInt32(1), at: GuestAddress(0x10)) }
        let d = DoorbellDevice(memory: m)
        _ = d.write(offset: 0x10, size: 4, value: 4)
        _ = d.write(offset: 0x14, size: 4, value: 1)
        _ = d.write(offset: 0x40, size: 4, value: 7)
        #expect(d.read(offset: 0x18, size: 4) != 0 && d.read(offset: 4, size: 4) == 0)
    }
}

@Suite("Concurrent pauses")
struct ConcurrentPauseTests {
    @Test("two vCPUs pausing from their handlers at once take turns instead of deadlocking")
    func twoHandlersPause() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock, vcpus: 2)
        let h = ReviewRegressionTests.PauseFromHandler()
        vm.addExitHandler(h)
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        for i in 0..<2 { mock.vcpu(i)?.script(Array(repeating: out(0x90, 1), count: 20) + [.exit(.halt)]) }
        #expect(try vm.run() == .halted)
        #expect(h.results.count == 40 && h.results.allSatisfy { $0 })
    }
}

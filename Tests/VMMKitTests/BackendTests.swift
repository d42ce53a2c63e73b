import Testing
import VMMKit
import VMMKitTesting
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

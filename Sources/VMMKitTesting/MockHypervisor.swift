import VMMKit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A hypervisor for unit tests: no `/dev/kvm`, scripted exits, a log of
/// every call and injectable errors (the model is swift-nio's `EmbeddedChannel`).
///
/// ```swift
/// let mock = MockHypervisor()
/// let vm = try VirtualMachine(backend: mock, configuration: .init(memorySize: 4 << 20))
/// mock.vcpu(0)?.script([.exit(.io(PortIO(port: 0xf4, size: 1, direction: .write, value: 3)))])
/// let reason = try vm.run()            // .guestExit(status: 3) with a DebugExitDevice at 0xf4
/// let leftover = mock.finish()         // steps not consumed, errors not delivered
/// ```
public final class MockHypervisor: HypervisorBackend, @unchecked Sendable {
    /// `"mock"`.
    public var name: String { "mock" }
    /// The call log.
    public let log = MockCallLog()
    /// What `KVM_GET_SUPPORTED_CPUID` returns.
    public var supportedCPUID: [CPUIDEntry] = [
        CPUIDEntry(function: 0, eax: 0xd, ebx: 0x6874_7541, ecx: 0x444d_4163, edx: 0x6974_6e65),
        CPUIDEntry(function: 1, eax: 0x800f12, ebx: 0, ecx: 0, edx: 0x0789_fbff),
    ]
    /// What `KVM_CHECK_EXTENSION` answers for a capability, read when a VM is
    /// created; capabilities not listed answer 1 (present).
    public var capabilities: [Int32: Int32] = [
        Int32(KVMCapability.nrMemslots): 32764,
        Int32(KVMCapability.disableQuirks2): Int32(KVMCapability.x86QuirkSlotZapAll),
        Int32(KVMCapability.exitOnEmulationFailure): 1,
    ]
    private let vmsLock = Locked<[MockVM]>([])

    /// Creates a mock hypervisor.
    public init() {}

    /// The VMs created so far.
    public var vms: [MockVM] { vmsLock.withLock { $0 } }

    /// vCPU `id` of the most recently created VM.
    public func vcpu(_ id: Int) -> MockVCPU? {
        guard let vm = vms.last, id >= 0, id < vm.vcpus.count else { return nil }
        return vm.vcpus[id]
    }

    /// Creates a mock VM.
    public func createVM() throws(BackendError) -> any VMBackend {
        try log.record(.createVM)
        let vm = MockVM(hypervisor: self)
        vmsLock.withLock { $0.append(vm) }
        return vm
    }

    /// What was left over: script steps no `KVM_RUN` consumed (per vCPU) and injected errors never delivered.
    /// Empty when the test consumed everything it set up.
    public func finish() -> MockLeftovers {
        var steps: [Int: [String]] = [:]
        for vm in vms { for v in vm.vcpus { let s = v.remainingSteps; if !s.isEmpty { steps[v.id] = s.map(\.description) } } }
        return MockLeftovers(steps: steps, failures: log.undeliveredFailures)
    }
}

/// What a mock test set up but did not use (see ``MockHypervisor/finish()``).
public struct MockLeftovers: Hashable, Sendable {
    /// Unconsumed script steps per vCPU.
    public var steps: [Int: [String]]
    /// Injected errors not delivered, per operation.
    public var failures: [MockOperation: [Errno]]
    /// Whether nothing was left over.
    public var isEmpty: Bool { steps.isEmpty && failures.isEmpty }
}

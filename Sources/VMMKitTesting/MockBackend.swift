import VMMKit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The operations of the mock backend, named after the KVM ioctls they stand for.
public enum MockOperation: String, Hashable, Sendable, CaseIterable {
    /// Stands for `KVM_CREATE_VM`.
    case createVM = "KVM_CREATE_VM"
    /// Stands for `KVM_SET_USER_MEMORY_REGION`.
    case setUserMemoryRegion = "KVM_SET_USER_MEMORY_REGION"
    /// Stands for `KVM_CREATE_VCPU`.
    case createVCPU = "KVM_CREATE_VCPU"
    /// Stands for `KVM_GET_SUPPORTED_CPUID`.
    case getSupportedCPUID = "KVM_GET_SUPPORTED_CPUID"
    /// Stands for `KVM_GET_DIRTY_LOG`.
    case getDirtyLog = "KVM_GET_DIRTY_LOG"
    /// Stands for `KVM_SET_TSS_ADDR`.
    case setTSSAddress = "KVM_SET_TSS_ADDR"
    /// Stands for `KVM_CREATE_IRQCHIP`.
    case createIRQChip = "KVM_CREATE_IRQCHIP"
    /// Stands for `KVM_IRQ_LINE`.
    case irqLine = "KVM_IRQ_LINE"
    /// Stands for `KVM_IRQFD`.
    case irqfd = "KVM_IRQFD"
    /// Stands for `KVM_IOEVENTFD`.
    case ioeventfd = "KVM_IOEVENTFD"
    /// Stands for `KVM_REGISTER_COALESCED_MMIO`.
    case registerCoalescedMMIO = "KVM_REGISTER_COALESCED_MMIO"
    /// Stands for `KVM_UNREGISTER_COALESCED_MMIO`.
    case unregisterCoalescedMMIO = "KVM_UNREGISTER_COALESCED_MMIO"
    /// Stands for `KVM_ENABLE_CAP`.
    case enableCapability = "KVM_ENABLE_CAP"
    /// Stands for `KVM_RUN`.
    case run = "KVM_RUN"
    /// Stands for `KVM_GET_REGS`.
    case getRegisters = "KVM_GET_REGS"
    /// Stands for `KVM_SET_REGS`.
    case setRegisters = "KVM_SET_REGS"
    /// Stands for `KVM_GET_SREGS`.
    case getSpecialRegisters = "KVM_GET_SREGS"
    /// Stands for `KVM_SET_SREGS`.
    case setSpecialRegisters = "KVM_SET_SREGS"
    /// Stands for `KVM_SET_CPUID2`.
    case setCPUID = "KVM_SET_CPUID2"
    /// Stands for `KVM_GET_MSRS`.
    case getMSRs = "KVM_GET_MSRS"
    /// Stands for `KVM_SET_MSRS`.
    case setMSRs = "KVM_SET_MSRS"
    /// Stands for `KVM_GET_FPU`.
    case getFPU = "KVM_GET_FPU"
    /// Stands for `KVM_SET_FPU`.
    case setFPU = "KVM_SET_FPU"
    /// Stands for `KVM_GET_XSAVE`.
    case getXSAVE = "KVM_GET_XSAVE"
    /// Stands for `KVM_SET_XSAVE`.
    case setXSAVE = "KVM_SET_XSAVE"
    /// Stands for `KVM_GET_LAPIC`.
    case getLAPIC = "KVM_GET_LAPIC"
    /// Stands for `KVM_SET_LAPIC`.
    case setLAPIC = "KVM_SET_LAPIC"
    /// Stands for `KVM_GET_VCPU_EVENTS`.
    case getVCPUEvents = "KVM_GET_VCPU_EVENTS"
    /// Stands for `KVM_SET_VCPU_EVENTS`.
    case setVCPUEvents = "KVM_SET_VCPU_EVENTS"
}

/// One recorded call to the mock backend.
public struct MockCall: Hashable, Sendable, CustomStringConvertible {
    /// The operation.
    public var operation: MockOperation
    /// The vCPU, for vCPU operations.
    public var vcpu: Int?
    /// A short rendering of the arguments.
    public var detail: String

    /// `KVM_RUN vcpu0 ...`.
    public var description: String {
        var s = operation.rawValue
        if let v = vcpu { s += " vcpu\(v)" }
        if !detail.isEmpty { s += " " + detail }
        return s
    }
}

/// A step of a mock vCPU's script: what its next `KVM_RUN` does.
public enum MockStep: Sendable, CustomStringConvertible {
    /// Return this exit. `data` is the exit's data (port I/O elements, the MMIO/MSR value).
    case exit(VMExit, data: [UInt64] = [])
    /// Fail with this errno (`EINTR` is returned as ``VMExit/interrupted``, like KVM).
    case fail(Errno)
    /// Behave like a guest that never exits: block until kicked, then return ``VMExit/interrupted``
    /// (the step stays at the head of the script until a kick ends it).
    case spin

    /// A short description.
    public var description: String {
        switch self {
        case .exit(let e, let d): d.isEmpty ? "exit \(e)" : "exit \(e) data \(d)"
        case .fail(let e): "fail \(e)"
        case .spin: "spin"
        }
    }
}

/// A record of everything the mock backend was asked to do, shared by a hypervisor's VMs and vCPUs.
public final class MockCallLog: @unchecked Sendable {
    private let lock = Locked<[MockCall]>([])
    private let failures = Locked<[MockOperation: [Errno]]>([:])

    init() {}

    /// Every call so far, in order.
    public var calls: [MockCall] { lock.withLock { $0 } }

    /// The calls of one operation.
    public func calls(_ op: MockOperation) -> [MockCall] { calls.filter { $0.operation == op } }

    /// Makes the next `count` calls of `op` fail with `errno` (queued after earlier injections).
    public func inject(_ errno: Errno, into op: MockOperation, count: Int = 1) {
        failures.withLock { $0[op, default: []].append(contentsOf: Array(repeating: errno, count: count)) }
    }

    func record(_ op: MockOperation, vcpu: Int? = nil, _ detail: String = "") throws(BackendError) {
        lock.withLock { $0.append(MockCall(operation: op, vcpu: vcpu, detail: detail)) }
        let injected: Errno? = failures.withLock { f in
            guard var list = f[op], !list.isEmpty else { return nil }
            let e = list.removeFirst()
            f[op] = list
            return e
        }
        if let e = injected { throw BackendError(op.rawValue, errno: e, detail: "injected by the mock backend") }
    }

    /// Errors injected but not yet delivered.
    public var undeliveredFailures: [MockOperation: [Errno]] { failures.withLock { $0.filter { !$0.value.isEmpty } } }
}

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

/// A mock VM: records memory slots and creates ``MockVCPU``s.
public final class MockVM: VMBackend, @unchecked Sendable {
    private let log: MockCallLog
    private let cpuid: [CPUIDEntry]
    private let state = Locked<(slots: [UInt32: MemorySlot], vcpus: [MockVCPU], zones: [CoalescedZone], irqs: [UInt32: Bool])>(([:], [], [], [:]))

    init(hypervisor: MockHypervisor) {
        // Keep what the VM needs, not the hypervisor: a VM may outlive it.
        log = hypervisor.log
        cpuid = hypervisor.supportedCPUID
    }

    /// The memory slots, by slot number.
    public var slots: [UInt32: MemorySlot] { state.withLock { $0.slots } }
    /// The vCPUs.
    public var vcpus: [MockVCPU] { state.withLock { $0.vcpus } }
    /// Registered coalesced zones.
    public var coalescedZones: [CoalescedZone] { state.withLock { $0.zones } }
    /// IRQ line levels set through ``setIRQLine(_:level:)``.
    public var irqLevels: [UInt32: Bool] { state.withLock { $0.irqs } }

    /// Records the slot (size 0 deletes it).
    public func setUserMemoryRegion(_ slot: MemorySlot) throws(BackendError) {
        try log.record(.setUserMemoryRegion, "slot \(slot.slot) \(slot.range) flags \(slot.flags.rawValue)")
        state.withLock { s in if slot.range.size == 0 { s.slots[slot.slot] = nil } else { s.slots[slot.slot] = slot } }
    }

    /// Creates a mock vCPU.
    public func createVCPU(id: Int) throws(BackendError) -> any VCPUBackend {
        try log.record(.createVCPU, "\(id)")
        let v = MockVCPU(id: id, log: log)
        state.withLock { $0.vcpus.append(v) }
        return v
    }

    /// Returns the hypervisor's ``MockHypervisor/supportedCPUID`` as it was when the VM was created.
    public func supportedCPUID() throws(BackendError) -> [CPUIDEntry] {
        try log.record(.getSupportedCPUID)
        return cpuid
    }
    /// Every capability is reported present (1).
    public func checkExtension(_ capability: Int32) -> Int32 { 1 }
    /// An all-clear bitmap.
    public func dirtyLog(slot: UInt32, pageCount: Int) throws(BackendError) -> [UInt64] {
        try log.record(.getDirtyLog, "slot \(slot)")
        return Array(repeating: 0, count: max(1, (pageCount + 63) / 64))
    }
    /// Records the call.
    public func setTSSAddress(_ address: UInt64) throws(BackendError) { try log.record(.setTSSAddress, "0x" + String(address, radix: 16)) }
    /// Records the call.
    public func createIRQChip() throws(BackendError) { try log.record(.createIRQChip) }
    /// Records the level.
    public func setIRQLine(_ irq: UInt32, level: Bool) throws(BackendError) {
        try log.record(.irqLine, "\(irq)=\(level ? 1 : 0)")
        state.withLock { $0.irqs[irq] = level }
    }
    /// Records the call.
    public func registerIRQFD(fd: Int32, gsi: UInt32) throws(BackendError) { try log.record(.irqfd, "fd \(fd) gsi \(gsi)") }
    /// Records the call.
    public func registerIOEventFD(_ event: IOEventFD) throws(BackendError) { try log.record(.ioeventfd, "0x" + String(event.address, radix: 16)) }
    /// Records the zone.
    public func registerCoalescedZone(_ zone: CoalescedZone) throws(BackendError) {
        try log.record(.registerCoalescedMMIO, "0x" + String(zone.address, radix: 16))
        state.withLock { $0.zones.append(zone) }
    }
    /// Records the capability.
    public func enableCapability(_ capability: UInt32, args: [UInt64]) throws(BackendError) {
        try log.record(.enableCapability, "\(capability) \(args)")
    }
    /// Removes the zone.
    public func unregisterCoalescedZone(_ zone: CoalescedZone) throws(BackendError) {
        try log.record(.unregisterCoalescedMMIO, "0x" + String(zone.address, radix: 16))
        state.withLock { $0.zones.removeAll { $0 == zone } }
    }
}

/// A mock vCPU: runs a script of exits, keeps registers in memory and records
/// what handlers supplied for reads.
public final class MockVCPU: VCPUBackend, @unchecked Sendable {
    /// The vCPU index.
    public let id: Int
    private let log: MockCallLog

    struct State {
        var script: [MockStep] = []
        var current: (exit: VMExit, data: [UInt64])?
        var regs = Registers()
        var sregs = SpecialRegisters()
        var cpuid: [CPUIDEntry] = []
        var msrs: [UInt32: UInt64] = [:]
        var reads: [Int: UInt64] = [:]
        var completed: [[Int: UInt64]] = []
        var runs = 0
        var fpu = FPUState(bytes: Array(repeating: 0, count: 416))
        var xsave = XSAVEState(bytes: Array(repeating: 0, count: 4096))
        var lapic = LAPICState(bytes: Array(repeating: 0, count: 1024))
        var events = VCPUEvents(bytes: Array(repeating: 0, count: 64))
        var coalesced: [CoalescedWrite] = []
    }
    private let state = Locked(State())
    private let immediateExit = Atomic<Bool>(false)
    private let wake = Locked<Bool>(false)

    init(id: Int, log: MockCallLog) {
        self.id = id
        self.log = log
    }

    /// Appends steps to the script.
    public func script(_ steps: [MockStep]) { state.withLock { $0.script.append(contentsOf: steps) } }

    /// Steps not yet consumed.
    public var remainingSteps: [MockStep] { state.withLock { $0.script } }
    /// The number of `KVM_RUN` calls that entered the "guest" (not refused by `immediate_exit`).
    public var runCount: Int { state.withLock { $0.runs } }
    /// For each exit that a later `KVM_RUN` completed, what handlers supplied through
    /// ``setExitData(_:at:)`` (element index → value). An exit is complete when the next run starts,
    /// as with KVM, so the last exit of a run that ends in a halt is included.
    public var completedReads: [[Int: UInt64]] { state.withLock { $0.completed } }
    /// The CPUID set by ``setCPUID(_:)``.
    public var cpuid: [CPUIDEntry] { state.withLock { $0.cpuid } }
    /// The register file.
    public var currentRegisters: Registers {
        get { state.withLock { $0.regs } }
        set { state.withLock { $0.regs = newValue } }
    }

    /// Consumes the next script step. With `immediate_exit` set it returns
    /// ``VMExit/interrupted`` at once, as KVM does. With the script empty it returns ``VMExit/halt``.
    public func run() throws(BackendError) -> VMExit {
        try log.record(.run, vcpu: id)
        state.withLock { s in
            if s.current != nil { s.completed.append(s.reads) }
            s.current = nil
            s.reads = [:]
        }
        if immediateExit.load(ordering: .sequentiallyConsistent) { return .interrupted }
        let step: MockStep? = state.withLock { s in
            s.runs += 1
            guard let first = s.script.first else { return nil }
            if case .spin = first {} else { s.script.removeFirst() }
            return first
        }
        switch step {
        case nil:
            return .halt
        case .fail(let e):
            if e == .interrupted { return .interrupted }
            throw BackendError(MockOperation.run.rawValue, errno: e, detail: "scripted")
        case .spin:
            // Block like a guest in a tight loop until kicked.
            while !immediateExit.load(ordering: .sequentiallyConsistent) {
                let woke = wake.withLock { w in let r = w; w = false; return r }
                if woke { break }
                sleepBriefly()
            }
            state.withLock { s in if case .spin? = s.script.first { s.script.removeFirst() } }
            return .interrupted
        case .exit(let e, let data):
            state.withLock { s in
                s.current = (e, data)
                if case .io(let io) = e, io.direction == .write, io.count == 1, data.isEmpty { s.current = (e, [io.value]) }
                if case .mmio(let m) = e, m.direction == .write, data.isEmpty { s.current = (e, [m.value]) }
                if case .msrWrite(_, let v) = e, data.isEmpty { s.current = (e, [v]) }
            }
            return e
        }
    }

    private func sleepBriefly() {
        usleep(200)
    }

    /// The scripted data element `index` of the current exit (0 when absent).
    public func exitData(at index: Int) -> UInt64 {
        state.withLock { s in
            guard let c = s.current, index >= 0, index < c.data.count else { return 0 }
            return c.data[index]
        }
    }

    /// Records what a handler supplied for element `index` of a read.
    public func setExitData(_ value: UInt64, at index: Int) {
        state.withLock { $0.reads[index] = value }
    }

    /// Records a rejected MSR access (as element -1 of the completed reads, value 1).
    public func rejectMSRAccess() {
        state.withLock { $0.reads[-1] = 1 }
    }

    /// Sets or clears `immediate_exit`.
    public func setImmediateExit(_ on: Bool) {
        immediateExit.store(on, ordering: .sequentiallyConsistent)
    }

    /// Sets `immediate_exit` and wakes a spinning step.
    public func kick() {
        immediateExit.store(true, ordering: .sequentiallyConsistent)
        wake.withLock { $0 = true }
    }

    /// Nothing to bind: the mock needs no signal.
    public func bindToCurrentThread() {}
    /// Nothing to unbind.
    public func unbindThread() {}

    /// Queues writes as if the guest had made them to a coalesced zone; the VM applies them at its next exit.
    public func queueCoalescedWrites(_ writes: [CoalescedWrite]) { state.withLock { $0.coalesced.append(contentsOf: writes) } }

    /// Hands over the queued coalesced writes.
    public func drainCoalescedWrites(_ body: (CoalescedWrite) -> Void) {
        let w: [CoalescedWrite] = state.withLock { s in let w = s.coalesced; s.coalesced = []; return w }
        for x in w { body(x) }
    }

    /// The register file.
    public func registers() throws(BackendError) -> Registers {
        try log.record(.getRegisters, vcpu: id)
        return state.withLock { $0.regs }
    }
    /// Sets the register file.
    public func setRegisters(_ regs: Registers) throws(BackendError) {
        try log.record(.setRegisters, vcpu: id, "rip=0x" + String(regs.rip, radix: 16))
        state.withLock { $0.regs = regs }
    }
    /// The special registers.
    public func specialRegisters() throws(BackendError) -> SpecialRegisters {
        try log.record(.getSpecialRegisters, vcpu: id)
        return state.withLock { $0.sregs }
    }
    /// Sets the special registers.
    public func setSpecialRegisters(_ sregs: SpecialRegisters) throws(BackendError) {
        try log.record(.setSpecialRegisters, vcpu: id, "cr0=0x" + String(sregs.cr0, radix: 16))
        state.withLock { $0.sregs = sregs }
    }
    /// Records the CPUID.
    public func setCPUID(_ entries: [CPUIDEntry]) throws(BackendError) {
        try log.record(.setCPUID, vcpu: id, "\(entries.count) entries")
        state.withLock { $0.cpuid = entries }
    }
    /// Reads MSRs from the in-memory MSR file (absent MSRs read 0).
    public func msrs(_ indices: [UInt32]) throws(BackendError) -> [MSREntry] {
        try log.record(.getMSRs, vcpu: id)
        return state.withLock { s in indices.map { MSREntry(index: $0, value: s.msrs[$0] ?? 0) } }
    }
    /// Writes MSRs into the in-memory MSR file.
    public func setMSRs(_ entries: [MSREntry]) throws(BackendError) {
        try log.record(.setMSRs, vcpu: id)
        state.withLock { s in for e in entries { s.msrs[e.index] = e.value } }
    }
    /// The FPU state.
    public func fpu() throws(BackendError) -> FPUState { try log.record(.getFPU, vcpu: id); return state.withLock { $0.fpu } }
    /// Sets the FPU state.
    public func setFPU(_ v: FPUState) throws(BackendError) { try log.record(.setFPU, vcpu: id); state.withLock { $0.fpu = v } }
    /// The XSAVE area.
    public func xsave() throws(BackendError) -> XSAVEState { try log.record(.getXSAVE, vcpu: id); return state.withLock { $0.xsave } }
    /// Sets the XSAVE area.
    public func setXSAVE(_ v: XSAVEState) throws(BackendError) { try log.record(.setXSAVE, vcpu: id); state.withLock { $0.xsave = v } }
    /// The LAPIC state.
    public func lapic() throws(BackendError) -> LAPICState { try log.record(.getLAPIC, vcpu: id); return state.withLock { $0.lapic } }
    /// Sets the LAPIC state.
    public func setLAPIC(_ v: LAPICState) throws(BackendError) { try log.record(.setLAPIC, vcpu: id); state.withLock { $0.lapic = v } }
    /// The pending events.
    public func vcpuEvents() throws(BackendError) -> VCPUEvents { try log.record(.getVCPUEvents, vcpu: id); return state.withLock { $0.events } }
    /// Sets the pending events.
    public func setVCPUEvents(_ v: VCPUEvents) throws(BackendError) { try log.record(.setVCPUEvents, vcpu: id); state.withLock { $0.events = v } }
}

/// A value behind a pthread mutex. (Not `Synchronization.Mutex`: its Linux
/// implementation waits on futexes directly, which ThreadSanitizer cannot see,
/// so tests run under TSan would report false races.)
final class Locked<Value>: @unchecked Sendable {
    private var value: Value
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)

    init(_ value: Value) {
        self.value = value
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}

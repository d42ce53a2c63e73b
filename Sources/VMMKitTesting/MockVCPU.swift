import VMMKit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A mock vCPU: runs a script of exits, keeps registers in memory and records
/// what handlers supplied for reads.
public final class MockVCPU: VCPUBackend, @unchecked Sendable {
    /// The vCPU index.
    public let id: Int
    private let log: MockCallLog
    private weak var vm: MockVM?

    struct State {
        /// The script; steps before `head` are consumed (dropped in batches, so consuming is O(1)).
        var script: [MockStep] = []
        var head = 0
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

        /// The step at the head of the script, consumed unless it is a `.spin` (a kick ends that one).
        mutating func nextStep() -> MockStep? {
            guard head < script.count else { return nil }
            let first = script[head]
            if case .spin = first {} else { consumeHead() }
            return first
        }

        /// Consumes the step at `head`; drops consumed steps once they are half the array.
        mutating func consumeHead() {
            head += 1
            if head >= 1024 && head * 2 >= script.count {
                script.removeFirst(head)
                head = 0
            }
        }
    }
    private let state = Locked(State())
    private let immediateExit = Atomic<Bool>(false)
    private let wake = Locked<Bool>(false)

    init(id: Int, log: MockCallLog, vm: MockVM? = nil) {
        self.id = id
        self.log = log
        self.vm = vm
    }

    /// Appends steps to the script.
    public func script(_ steps: [MockStep]) { state.withLock { $0.script.append(contentsOf: steps) } }

    /// Steps not yet consumed.
    public var remainingSteps: [MockStep] { state.withLock { Array($0.script[$0.head...]) } }
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
        var step: MockStep? = state.withLock { s in
            s.runs += 1
            return s.nextStep()
        }
        // Guest stores that land in writable memory do not exit: the guest runs on to the next step.
        while case .guestStore(let address, let size, let value)? = step {
            let exits = vm?.guestStore(address, size: size, value: value) ?? [MMIOAccess(address: address, size: UInt8(clamping: size), direction: .write, value: value)]
            step = state.withLock { s in
                if !exits.isEmpty {
                    s.script.insert(contentsOf: exits.map { MockStep.exit(.mmio($0)) }, at: s.head)
                }
                return s.nextStep()
            }
        }
        switch step {
        case nil, .guestStore:
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
            // One kick ends one spin: a wake left over from a kick seen through immediate_exit
            // would end the next spin at once (two spins per kick made spin counts racy).
            wake.withLock { $0 = false }
            state.withLock { s in if s.head < s.script.count, case .spin = s.script[s.head] { s.consumeHead() } }
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

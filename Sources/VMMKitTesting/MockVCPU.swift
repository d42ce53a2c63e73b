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
        var pending: PendingInstruction?
        var ripModel = MockRIPModel.pvm

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
    /// The instruction of a scripted ``MockStep/access(_:length:destination:data:)`` not yet completed.
    struct PendingInstruction {
        var exit: VMExit
        var length: UInt64
        var destination: MockRegister
        /// RIP stays on the instruction until completion (else it moved past at the exit).
        var onInstruction: Bool
        /// A register write-back under the PVM model dropped the loaded value.
        var dropped = false
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
    /// Where RIP is at scripted accesses (default ``MockRIPModel/pvm``, this project's machines).
    public var ripModel: MockRIPModel {
        get { state.withLock { $0.ripModel } }
        set { state.withLock { $0.ripModel = newValue } }
    }
    /// Whether a scripted access waits for the next `KVM_RUN` to complete it.
    public var hasPendingAccess: Bool { state.withLock { $0.pending != nil } }
    /// The register file.
    public var currentRegisters: Registers {
        get { state.withLock { $0.regs } }
        set { state.withLock { $0.regs = newValue } }
    }

    /// Consumes the next script step. With `immediate_exit` set it returns
    /// ``VMExit/interrupted`` at once, as KVM does. With the script empty it returns ``VMExit/halt``.
    public func run() throws(BackendError) -> VMExit {
        try log.record(.run, vcpu: id)
        // Completing the previous exit: a scripted continuation of its
        // instruction comes back at once, even with immediate_exit set.
        if let further: VMExit = state.withLock({ s in
            if s.current != nil { s.completed.append(s.reads) }
            s.current = nil
            s.reads = [:]
            if s.pending != nil, s.head < s.script.count, case .continuation(let e, let data) = s.script[s.head] {
                s.consumeHead()
                s.pending?.exit = e
                s.current = MockVCPU.current(e, data)
                return e
            }
            MockVCPU.finish(&s)
            return nil
        }) {
            return further
        }
        if immediateExit.load(ordering: .sequentiallyConsistent) { return .interrupted }
        var step: MockStep? = state.withLock { s in
            s.runs += 1
            return s.nextStep()
        }
        // Guest stores that land in writable memory and branches do not exit: the guest runs on to the next step.
        while true {
            if case .guestStore(let address, let size, let value)? = step {
                let exits = vm?.guestStore(address, size: size, value: value) ?? [MMIOAccess(address: address, size: UInt8(clamping: size), direction: .write, value: value)]
                step = state.withLock { s in
                    if !exits.isEmpty {
                        s.script.insert(contentsOf: exits.map { MockStep.exit(.mmio($0)) }, at: s.head)
                    }
                    return s.nextStep()
                }
            } else if case .jump(let rip)? = step {
                step = state.withLock { s in
                    s.regs.rip = rip
                    return s.nextStep()
                }
            } else {
                break
            }
        }
        switch step {
        case nil, .guestStore, .jump:
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
        case .exit(let e, let data), .continuation(let e, let data):
            state.withLock { s in s.current = MockVCPU.current(e, data) }
            return e
        case .access(let e, let length, let destination, let data):
            state.withLock { s in
                s.current = MockVCPU.current(e, data)
                let on = MockVCPU.staysOnInstruction(e, s.ripModel)
                if !on { s.regs.rip &+= UInt64(length) }
                s.pending = PendingInstruction(exit: e, length: UInt64(length), destination: destination, onInstruction: on)
            }
            return e
        }
    }

    /// The current-exit record of a scripted exit: writes carry their value as element 0.
    private static func current(_ e: VMExit, _ data: [UInt64]) -> (exit: VMExit, data: [UInt64]) {
        guard data.isEmpty else { return (e, data) }
        switch e {
        case .io(let io) where io.direction == .write && io.count == 1: return (e, [io.value])
        case .mmio(let m) where m.direction == .write: return (e, [m.value])
        case .msrWrite(_, let v): return (e, [v])
        default: return (e, data)
        }
    }

    /// Whether RIP stays on the instruction of `exit` until completion under `model`.
    static func staysOnInstruction(_ exit: VMExit, _ model: MockRIPModel) -> Bool {
        switch exit {
        case .io(let io): io.direction == .read || io.count > 1 || model == .hardware
        case .mmio(let m): m.direction == .read
        default: true
        }
    }

    /// Completes the pending scripted instruction: loads the value supplied
    /// (all ones when none was, as KVM's buffer holds) and moves RIP past it.
    private static func finish(_ s: inout State) {
        guard let p = s.pending else { return }
        s.pending = nil
        let supplied = s.completed.last?[0]
        if !p.dropped {
            switch p.exit {
            case .io(let io) where io.direction == .read && io.count == 1:
                MockRegister.rax.load(supplied ?? allOnes(size: Int(io.size)), size: Int(io.size), in: &s.regs)
            case .mmio(let m) where m.direction == .read:
                p.destination.load(supplied ?? allOnes(size: Int(m.size)), size: Int(m.size), in: &s.regs)
            case .msrRead:
                if let v = supplied, s.completed.last?[-1] == nil {
                    s.regs.rax = v & 0xffff_ffff
                    s.regs.rdx = v >> 32
                }
            case .hypercall:
                if let v = supplied { s.regs.rax = v }
            default:
                break
            }
        }
        if p.onInstruction { s.regs.rip &+= p.length }
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
    /// Sets the register file. Under ``MockRIPModel/pvm``, doing so while a scripted load waits for
    /// completion drops the loaded value, as a register write-back does on this project's machines.
    public func setRegisters(_ regs: Registers) throws(BackendError) {
        try log.record(.setRegisters, vcpu: id, "rip=0x" + String(regs.rip, radix: 16))
        state.withLock { s in
            s.regs = regs
            if s.ripModel == .pvm, s.pending?.onInstruction == true { s.pending?.dropped = true }
        }
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

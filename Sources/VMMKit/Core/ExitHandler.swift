/// What a handler did with an exit.
public enum ExitResult: Hashable, Sendable {
    /// The exit is consumed; the vCPU runs on.
    case handled
    /// Not consumed: the next handler in the chain sees it.
    case pass
    /// Consumed, and this vCPU stops (it halted); the VM stops when every vCPU has.
    case stopVCPU
    /// Consumed, and the whole VM stops with this reason.
    case stopVM(StopReason)
}

/// A middleware in a vCPU's exit chain.
///
/// Each exit goes through the chain in order. A handler either consumes the
/// exit (returns anything but ``ExitResult/pass``) or passes it on. A handler
/// that wants to act around the rest of the chain (count, time, observe the
/// outcome) calls ``ExitContext/forward(_:)`` and returns its result.
///
/// Handlers run on vCPU threads; one handler instance is shared by all vCPUs
/// of a VM, so state it keeps must be per vCPU (indexed by
/// ``ExitContext/vcpuID``) or behind a lock.
/// The hot path must not allocate.
public protocol ExitHandler: AnyObject {
    /// Handles or passes on one exit.
    func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult
    /// Called once on each VM stop, after every vCPU has left `KVM_RUN` (flush buffers, drain rings).
    func vmDidStop(_ vm: VirtualMachine) throws(VMError)
}

extension ExitHandler {
    /// Does nothing by default.
    public func vmDidStop(_ vm: VirtualMachine) throws(VMError) {}
}

/// A handler made from a closure, for small VMMs and tests.
public final class ClosureExitHandler: ExitHandler {
    private let body: @Sendable (VMExit, ExitContext) throws(VMError) -> ExitResult
    /// Wraps `body`. It runs on vCPU threads, hence `@Sendable` (a closure
    /// written in top-level code would otherwise be main-actor isolated and
    /// trap when a vCPU thread calls it).
    public init(_ body: @escaping @Sendable (VMExit, ExitContext) throws(VMError) -> ExitResult) { self.body = body }
    /// Calls the closure.
    public func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult { try body(exit, context) }
}

/// The per-vCPU state a handler sees: the vCPU's registers, the exit's data,
/// guest memory, the bus and the rest of the chain. Not `Sendable`: it belongs
/// to the vCPU's thread.
public final class ExitContext {
    /// The vCPU index.
    public let vcpuID: Int
    /// The VM (memory, bus, devices).
    public unowned let vm: VirtualMachine
    let backend: any VCPUBackend
    private let handlers: [any ExitHandler]
    @exclusivity(unchecked) private var cursor = 0
    /// This vCPU's exit statistics (only this vCPU's thread writes them).
    @exclusivity(unchecked) public internal(set) var statistics: ExitStatistics
    /// Guest memory.
    public let memory: GuestMemory
    /// The I/O bus.
    public let bus: IOBus
    /// Whether coalesced zones were registered when the VM started.
    let drainsCoalesced: Bool

    init(vcpuID: Int, vm: VirtualMachine, backend: any VCPUBackend, handlers: [any ExitHandler], collectSites: Bool) {
        self.vcpuID = vcpuID
        self.vm = vm
        self.backend = backend
        self.handlers = handlers
        self.statistics = ExitStatistics(collectSites: collectSites)
        self.memory = vm.memory
        self.bus = vm.bus
        self.drainsCoalesced = vm.hasCoalescedZones
    }

    /// The vCPU's general registers (from sync regs: no ioctl on KVM).
    public func registers() throws(VMError) -> Registers {
        do { return try backend.registers() } catch { throw .backend(error) }
    }
    /// Sets the vCPU's general registers.
    public func setRegisters(_ r: Registers) throws(VMError) {
        do { try backend.setRegisters(r) } catch { throw .backend(error) }
    }
    /// The vCPU's special registers (an ioctl on KVM: keep it off the hot path).
    public func specialRegisters() throws(VMError) -> SpecialRegisters {
        do { return try backend.specialRegisters() } catch { throw .backend(error) }
    }
    /// Element `index` of the exit's data (string I/O elements; MMIO store value at 0).
    @inline(__always)
    public func ioData(at index: Int) -> UInt64 { backend.exitData(at: index) }
    /// Supplies element `index` of what a read (`in`, MMIO load, MSR read) returns to the guest.
    @inline(__always)
    public func completeRead(_ value: UInt64, at index: Int = 0) { backend.setExitData(value, at: index) }

    /// Fails the current MSR exit: the guest gets #GP.
    @inline(__always)
    public func rejectMSRAccess() { backend.rejectMSRAccess() }

    /// Runs the rest of the chain (the handlers after the current one) on `exit`.
    public func forward(_ exit: VMExit) throws(VMError) -> ExitResult {
        while cursor < handlers.count {
            let h = handlers[cursor]
            cursor += 1
            let r = try h.handle(exit, context: self)
            if r != .pass { return r }
        }
        return .pass
    }

    @inline(__always)
    func dispatch(_ exit: VMExit) throws(VMError) -> ExitResult {
        cursor = 0
        return try forward(exit)
    }
}

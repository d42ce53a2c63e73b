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

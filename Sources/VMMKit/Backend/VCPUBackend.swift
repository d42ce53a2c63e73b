/// One vCPU of a backend.
///
/// While the vCPU runs, all methods except ``kick()`` and
/// ``setImmediateExit(_:)`` must be called from the thread that runs it; while
/// its VM is stopped or paused, any one thread may call them.
public protocol VCPUBackend: AnyObject {
    /// The vCPU index.
    var id: Int { get }
    /// Runs the vCPU until the next exit. `EINTR` is not an error: it returns
    /// ``VMExit/interrupted``. The corresponding ioctl is `KVM_RUN`.
    func run() throws(BackendError) -> VMExit
    /// The general registers (from the sync-regs area after an exit when
    /// available, else `KVM_GET_REGS`).
    func registers() throws(BackendError) -> Registers
    /// RIP alone (cheaper than ``registers()`` where the backend can read just it).
    func instructionPointer() throws(BackendError) -> UInt64
    /// Sets the general registers (through the sync-regs area when available, else `KVM_SET_REGS`).
    func setRegisters(_ regs: Registers) throws(BackendError)
    /// The special registers. The corresponding ioctl is `KVM_GET_SREGS`.
    func specialRegisters() throws(BackendError) -> SpecialRegisters
    /// Sets the special registers. The corresponding ioctl is `KVM_SET_SREGS`.
    func setSpecialRegisters(_ sregs: SpecialRegisters) throws(BackendError)
    /// Sets the CPUID the guest sees. The corresponding ioctl is `KVM_SET_CPUID2`.
    func setCPUID(_ entries: [CPUIDEntry]) throws(BackendError)
    /// Reads MSRs. The corresponding ioctl is `KVM_GET_MSRS`.
    func msrs(_ indices: [UInt32]) throws(BackendError) -> [MSREntry]
    /// Writes MSRs. The corresponding ioctl is `KVM_SET_MSRS`.
    func setMSRs(_ entries: [MSREntry]) throws(BackendError)
    /// The FPU state. The corresponding ioctl is `KVM_GET_FPU`.
    func fpu() throws(BackendError) -> FPUState
    /// Sets the FPU state. The corresponding ioctl is `KVM_SET_FPU`.
    func setFPU(_ state: FPUState) throws(BackendError)
    /// The XSAVE area. The corresponding ioctl is `KVM_GET_XSAVE`.
    func xsave() throws(BackendError) -> XSAVEState
    /// Sets the XSAVE area. The corresponding ioctl is `KVM_SET_XSAVE`.
    func setXSAVE(_ state: XSAVEState) throws(BackendError)
    /// The local APIC state (needs an in-kernel irqchip). The corresponding ioctl is `KVM_GET_LAPIC`.
    func lapic() throws(BackendError) -> LAPICState
    /// Sets the local APIC state. The corresponding ioctl is `KVM_SET_LAPIC`.
    func setLAPIC(_ state: LAPICState) throws(BackendError)
    /// Pending events. The corresponding ioctl is `KVM_GET_VCPU_EVENTS`.
    func vcpuEvents() throws(BackendError) -> VCPUEvents
    /// Sets pending events. The corresponding ioctl is `KVM_SET_VCPU_EVENTS`.
    func setVCPUEvents(_ events: VCPUEvents) throws(BackendError)

    /// Element `index` of the current exit's data: a port I/O element, an internal-error word, the
    /// MMIO store value (index 0). Out-of-range indices read as 0.
    func exitData(at index: Int) -> UInt64
    /// Supplies element `index` of the data an `in`, MMIO load or MSR read
    /// returns to the guest when the vCPU next runs (for a hypercall: its
    /// return value). Out-of-range indices are ignored.
    func setExitData(_ value: UInt64, at index: Int)
    /// Makes the current MSR exit fail: the guest gets #GP, as for an MSR that does not exist.
    func rejectMSRAccess()
    /// Sets or clears `immediate_exit`: while set, ``run()`` completes any
    /// pending access and returns ``VMExit/interrupted`` without running guest
    /// code. Safe from any thread.
    func setImmediateExit(_ on: Bool)
    /// Makes a concurrent or upcoming ``run()`` return soon: sets
    /// `immediate_exit` and signals the vCPU's thread. Safe from any thread.
    func kick()
    /// Records the calling thread as the one that runs this vCPU (for ``kick()``).
    func bindToCurrentThread()
    /// Hands every write the kernel batched in the coalesced MMIO/PIO ring to
    /// `body`, oldest first, and frees their slots. Call it before handling an
    /// exit so batched writes reach devices in order.
    func drainCoalescedWrites(_ body: (CoalescedWrite) -> Void)
    /// Forgets the thread recorded by ``bindToCurrentThread()`` (the thread is about to end);
    /// later kicks only set `immediate_exit`.
    func unbindThread()
}

extension VCPUBackend {
    /// RIP from ``registers()``.
    public func instructionPointer() throws(BackendError) -> UInt64 { try registers().rip }
}

/// A hypervisor that can create virtual machines: the real KVM backend
/// (``KVMSystem``) or the mock backend of the `VMMKitTesting` module.
public protocol HypervisorBackend: AnyObject, Sendable {
    /// A short name for diagnostics (`kvm`, `mock`).
    var name: String { get }
    /// Creates an empty virtual machine. The corresponding ioctl is `KVM_CREATE_VM`.
    func createVM() throws(BackendError) -> any VMBackend
}

/// Flags of a guest memory slot.
public struct MemorySlotFlags: OptionSet, Hashable, Sendable {
    /// The raw `KVM_MEM_*` bits.
    public let rawValue: UInt32
    /// Creates flags from raw bits.
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `KVM_MEM_LOG_DIRTY_PAGES`: track written pages (read with ``VMBackend/dirtyLog(slot:pageCount:)``).
    public static let logDirtyPages = MemorySlotFlags(rawValue: 1)
    /// `KVM_MEM_READONLY`: guest writes exit as MMIO writes; reads are served from memory.
    public static let readOnly = MemorySlotFlags(rawValue: 2)
}

/// A guest memory slot: guest-physical range → host memory.
public struct MemorySlot: Hashable, @unchecked Sendable {
    /// The slot number.
    public var slot: UInt32
    /// Slot flags.
    public var flags: MemorySlotFlags
    /// The guest-physical range.
    public var range: GuestRange
    /// The host memory backing it (`nil` with size 0 deletes the slot).
    public var host: UnsafeMutableRawPointer?

    /// Creates a memory slot description.
    public init(slot: UInt32, flags: MemorySlotFlags = [], range: GuestRange, host: UnsafeMutableRawPointer?) {
        self.slot = slot; self.flags = flags; self.range = range; self.host = host
    }
}

/// A zone of guest addresses whose writes the kernel batches into a ring
/// instead of exiting (`KVM_REGISTER_COALESCED_MMIO`).
public struct CoalescedZone: Hashable, Sendable {
    /// The first address (or port).
    public var address: UInt64
    /// The size in bytes.
    public var size: UInt32
    /// `true` for port I/O, `false` for MMIO.
    public var isPIO: Bool
    /// Creates a zone.
    public init(address: UInt64, size: UInt32, isPIO: Bool) { self.address = address; self.size = size; self.isPIO = isPIO }
}

/// One write the kernel batched in a coalesced zone instead of exiting.
public struct CoalescedWrite: Hashable, Sendable {
    /// Port I/O or MMIO.
    public var space: BusSpace
    /// The port or guest-physical address.
    public var address: UInt64
    /// The width in bytes (1 to 8).
    public var size: Int
    /// The value written.
    public var value: UInt64
    /// Creates a write record.
    public init(space: BusSpace, address: UInt64, size: Int, value: UInt64) {
        self.space = space; self.address = address; self.size = size; self.value = value
    }
}

/// A registration of an eventfd signalled when the guest writes an address (`KVM_IOEVENTFD`).
public struct IOEventFD: Hashable, Sendable {
    /// The address or port.
    public var address: UInt64
    /// The access width (0 = any, or 1, 2, 4, 8).
    public var length: UInt32
    /// The eventfd.
    public var fd: Int32
    /// Port I/O instead of MMIO.
    public var isPIO: Bool
    /// Only writes of this value signal (nil: any value).
    public var datamatch: UInt64?
    /// Creates a registration.
    public init(address: UInt64, length: UInt32, fd: Int32, isPIO: Bool, datamatch: UInt64? = nil) {
        self.address = address; self.length = length; self.fd = fd; self.isPIO = isPIO; self.datamatch = datamatch
    }
}

/// One virtual machine of a backend: its memory slots, vCPUs and VM-wide devices.
public protocol VMBackend: AnyObject {
    /// Adds, changes or deletes a memory slot. The corresponding ioctl is `KVM_SET_USER_MEMORY_REGION`.
    func setUserMemoryRegion(_ slot: MemorySlot) throws(BackendError)
    /// Creates vCPU `id`. The corresponding ioctl is `KVM_CREATE_VCPU`.
    func createVCPU(id: Int) throws(BackendError) -> any VCPUBackend
    /// The CPUID leaves the hypervisor supports. The corresponding ioctl is `KVM_GET_SUPPORTED_CPUID`.
    func supportedCPUID() throws(BackendError) -> [CPUIDEntry]
    /// Whether the hypervisor has a capability (`KVM_CAP_*`). The corresponding ioctl is `KVM_CHECK_EXTENSION`.
    func checkExtension(_ capability: Int32) -> Int32
    /// Returns and clears the dirty bitmap of a slot, one bit per page. The corresponding ioctl is `KVM_GET_DIRTY_LOG`.
    func dirtyLog(slot: UInt32, pageCount: Int) throws(BackendError) -> [UInt64]
    /// Sets the address of the 3-page TSS region Intel hosts need. The corresponding ioctl is `KVM_SET_TSS_ADDR`.
    func setTSSAddress(_ address: UInt64) throws(BackendError)
    /// Creates the in-kernel interrupt controllers. The corresponding ioctl is `KVM_CREATE_IRQCHIP`.
    func createIRQChip() throws(BackendError)
    /// Drives an interrupt line of the in-kernel irqchip. The corresponding ioctl is `KVM_IRQ_LINE`.
    func setIRQLine(_ irq: UInt32, level: Bool) throws(BackendError)
    /// Routes an eventfd to a GSI. The corresponding ioctl is `KVM_IRQFD`.
    func registerIRQFD(fd: Int32, gsi: UInt32) throws(BackendError)
    /// Registers an ioeventfd. The corresponding ioctl is `KVM_IOEVENTFD`.
    func registerIOEventFD(_ event: IOEventFD) throws(BackendError)
    /// Registers a coalesced MMIO/PIO zone. The corresponding ioctl is `KVM_REGISTER_COALESCED_MMIO`.
    func registerCoalescedZone(_ zone: CoalescedZone) throws(BackendError)
    /// Removes a coalesced zone. The corresponding ioctl is `KVM_UNREGISTER_COALESCED_MMIO`.
    func unregisterCoalescedZone(_ zone: CoalescedZone) throws(BackendError)
    /// Enables a VM capability (`KVM_CAP_*`) with up to four arguments. The corresponding ioctl is `KVM_ENABLE_CAP`.
    func enableCapability(_ capability: UInt32, args: [UInt64]) throws(BackendError)
}

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

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

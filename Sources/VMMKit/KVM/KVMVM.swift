import CKVM
import Glibc

/// A KVM virtual machine (the VM file descriptor).
public final class KVMVM: VMBackend {
    /// The VM file descriptor.
    public let fd: Int32
    /// The system this VM belongs to.
    public let system: KVMSystem
    private var slotSizes: [UInt32: UInt64] = [:]
    /// How often `KVM_CREATE_VM` is retried after `EINTR` before the error is reported.
    static let createRetries = 1000

    init(system: KVMSystem) throws(BackendError) {
        self.system = system
        // KVM_CREATE_VM fails with EINTR when a signal arrives while it sets up
        // (mmu-notifier registration); QEMU, Cloud Hypervisor and Firecracker
        // retry it, and so does this, a bounded number of times.
        self.fd = try InterruptedCall.retrying(KVMVM.createRetries) { () throws(BackendError) in
            try Sys.ioctl(system.fd, CKVM_CREATE_VM, value: 0, "KVM_CREATE_VM")
        }
    }

    deinit { Sys.close(fd) }

    /// Adds, changes or deletes a slot. The corresponding ioctl is `KVM_SET_USER_MEMORY_REGION`.
    public func setUserMemoryRegion(_ slot: MemorySlot) throws(BackendError) {
        var region = kvm_userspace_memory_region(
            slot: slot.slot, flags: slot.flags.rawValue,
            guest_phys_addr: slot.range.start.rawValue, memory_size: slot.range.size,
            userspace_addr: UInt64(UInt(bitPattern: slot.host)))
        _ = try Sys.withStruct(&region) { (p) throws(BackendError) in
            try Sys.ioctl(fd, CKVM_SET_USER_MEMORY_REGION, p, "KVM_SET_USER_MEMORY_REGION")
        }
        slotSizes[slot.slot] = slot.range.size == 0 ? nil : slot.range.size
    }

    /// Creates a vCPU and maps its `kvm_run`. The corresponding ioctl is `KVM_CREATE_VCPU`.
    public func createVCPU(id: Int) throws(BackendError) -> any VCPUBackend {
        let vfd = try Sys.ioctl(fd, CKVM_CREATE_VCPU, value: UInt(id), "KVM_CREATE_VCPU")
        do throws(BackendError) {
            return try KVMVCPU(fd: vfd, id: id, mmapSize: system.vcpuMmapSize,
                               syncRegs: system.checkExtension(Int32(KVMCapability.syncRegs)) & Int32(KVM_SYNC_X86_REGS) != 0,
                               coalescedPage: checkExtension(Int32(KVMCapability.coalescedMMIO)))
        } catch {
            Sys.close(vfd)
            throw error
        }
    }

    /// The supported CPUID. The corresponding ioctl is `KVM_GET_SUPPORTED_CPUID`.
    public func supportedCPUID() throws(BackendError) -> [CPUIDEntry] { try system.supportedCPUID() }

    /// The value of a capability for this VM. The corresponding ioctl is `KVM_CHECK_EXTENSION`.
    public func checkExtension(_ capability: Int32) -> Int32 {
        (try? Sys.ioctl(fd, CKVM_CHECK_EXTENSION, value: UInt(capability), "KVM_CHECK_EXTENSION")) ?? 0
    }

    /// Returns and clears a slot's dirty bitmap. The corresponding ioctl is `KVM_GET_DIRTY_LOG`.
    /// The bitmap always covers the whole slot (KVM writes that much); `pageCount` is a minimum.
    public func dirtyLog(slot: UInt32, pageCount: Int) throws(BackendError) -> [UInt64] {
        guard let size = slotSizes[slot] else {
            throw BackendError("KVM_GET_DIRTY_LOG", errno: .invalidArgument, detail: "no memory slot \(slot)")
        }
        let pages = max(pageCount, Int(clamping: (size + 4095) / 4096))
        var bitmap = [UInt64](repeating: 0, count: max(1, (pages + 63) / 64))
        var failure: BackendError?
        bitmap.withUnsafeMutableBytes { buf in
            var log = kvm_dirty_log()
            log.slot = slot
            log.dirty_bitmap = buf.baseAddress
            do throws(BackendError) {
                _ = try Sys.withStruct(&log) { (p) throws(BackendError) in
                    try Sys.ioctl(fd, CKVM_GET_DIRTY_LOG, p, "KVM_GET_DIRTY_LOG")
                }
            } catch { failure = error }
        }
        if let failure { throw failure }
        return bitmap
    }

    /// Sets the TSS address. The corresponding ioctl is `KVM_SET_TSS_ADDR`.
    public func setTSSAddress(_ address: UInt64) throws(BackendError) {
        _ = try Sys.ioctl(fd, CKVM_SET_TSS_ADDR, value: UInt(address), "KVM_SET_TSS_ADDR")
    }

    /// Creates the in-kernel irqchip. The corresponding ioctl is `KVM_CREATE_IRQCHIP`.
    public func createIRQChip() throws(BackendError) {
        _ = try Sys.ioctl(fd, CKVM_CREATE_IRQCHIP, "KVM_CREATE_IRQCHIP")
    }

    /// Drives an interrupt line. The corresponding ioctl is `KVM_IRQ_LINE`.
    public func setIRQLine(_ irq: UInt32, level: Bool) throws(BackendError) {
        var line = kvm_irq_level()
        line.irq = irq
        line.level = level ? 1 : 0
        _ = try Sys.withStruct(&line) { (p) throws(BackendError) in try Sys.ioctl(fd, CKVM_IRQ_LINE, p, "KVM_IRQ_LINE") }
    }

    /// Routes an eventfd to a GSI. The corresponding ioctl is `KVM_IRQFD`.
    public func registerIRQFD(fd eventFD: Int32, gsi: UInt32) throws(BackendError) {
        var irqfd = kvm_irqfd()
        irqfd.fd = UInt32(bitPattern: eventFD)
        irqfd.gsi = gsi
        _ = try Sys.withStruct(&irqfd) { (p) throws(BackendError) in try Sys.ioctl(fd, CKVM_IRQFD, p, "KVM_IRQFD") }
    }

    /// Registers an ioeventfd. The corresponding ioctl is `KVM_IOEVENTFD`.
    public func registerIOEventFD(_ event: IOEventFD) throws(BackendError) {
        var e = kvm_ioeventfd()
        e.addr = event.address
        e.len = event.length
        e.fd = event.fd
        var flags: UInt32 = 0
        if event.isPIO { flags |= UInt32(1 << kvm_ioeventfd_flag_nr_pio) }
        if let dm = event.datamatch {
            flags |= UInt32(1 << kvm_ioeventfd_flag_nr_datamatch)
            e.datamatch = dm
        }
        e.flags = flags
        _ = try Sys.withStruct(&e) { (p) throws(BackendError) in try Sys.ioctl(fd, CKVM_IOEVENTFD, p, "KVM_IOEVENTFD") }
    }

    /// Registers a coalesced zone. The corresponding ioctl is `KVM_REGISTER_COALESCED_MMIO`.
    public func registerCoalescedZone(_ zone: CoalescedZone) throws(BackendError) {
        try coalescedZoneIoctl(zone, CKVM_REGISTER_COALESCED_MMIO, "KVM_REGISTER_COALESCED_MMIO")
    }

    private func coalescedZoneIoctl(_ zone: CoalescedZone, _ request: UInt, _ name: StaticString) throws(BackendError) {
        var z = kvm_coalesced_mmio_zone()
        z.addr = zone.address
        z.size = zone.size
        z.pio = zone.isPIO ? 1 : 0
        _ = try Sys.withStruct(&z) { (p) throws(BackendError) in try Sys.ioctl(fd, request, p, name) }
    }

    /// Enables a VM capability. The corresponding ioctl is `KVM_ENABLE_CAP`.
    public func enableCapability(_ capability: UInt32, args: [UInt64]) throws(BackendError) {
        var c = kvm_enable_cap()
        c.cap = capability
        withUnsafeMutableBytes(of: &c.args) { b in
            for (i, a) in args.prefix(4).enumerated() { b.storeBytes(of: a, toByteOffset: i * 8, as: UInt64.self) }
        }
        _ = try Sys.withStruct(&c) { (p) throws(BackendError) in try Sys.ioctl(fd, CKVM_ENABLE_CAP, p, "KVM_ENABLE_CAP") }
    }

    /// Removes a coalesced zone. The corresponding ioctl is `KVM_UNREGISTER_COALESCED_MMIO`.
    public func unregisterCoalescedZone(_ zone: CoalescedZone) throws(BackendError) {
        try coalescedZoneIoctl(zone, CKVM_UNREGISTER_COALESCED_MMIO, "KVM_UNREGISTER_COALESCED_MMIO")
    }
}

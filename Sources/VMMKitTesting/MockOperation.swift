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

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
    /// The guest stores `size` bytes (1 to 8) of `value`, little-endian, at a
    /// guest-physical address, as KVM would run it: split at a page boundary
    /// into per-page fragments; a fragment in a page a writable slot backs is
    /// written to memory (and the script goes on without an exit); one in a
    /// read-only slot or in no slot exits as an MMIO write (RIP past the store,
    /// memory untouched), one exit per fragment.
    case guestStore(GuestAddress, size: Int, value: UInt64)
    /// Return this exit for an instruction of `length` bytes at the current RIP, and model where
    /// RIP is (the vCPU's ``MockVCPU/ripModel``): RIP stays on the instruction or moves past it at
    /// the exit; the run that completes the access moves it past and, for a read, writes the value
    /// supplied into its register: `destination` for MMIO loads, RAX for `in` and hypercalls,
    /// EDX:EAX for `rdmsr`.
    case access(VMExit, length: UInt8, destination: MockRegister = .rax, data: [UInt64] = [])
    /// A further exit of the instruction of the access before it (the next element of string
    /// I/O, the second half of a split MMIO access): the run that completes the previous part
    /// returns it, even with `immediate_exit` set, and RIP moves only when the last part completes.
    case continuation(VMExit, data: [UInt64] = [])
    /// The guest branches to this RIP without exiting (a loop's back-edge, so that the next scripted
    /// access exits from the same instruction again); the script goes on to the next step.
    case jump(to: UInt64)

    /// A short description.
    public var description: String {
        switch self {
        case .exit(let e, let d): d.isEmpty ? "exit \(e)" : "exit \(e) data \(d)"
        case .fail(let e): "fail \(e)"
        case .spin: "spin"
        case .guestStore(let a, let n, let v): "guest store \(n) bytes 0x\(String(v, radix: 16)) at \(a)"
        case .access(let e, let n, let r, let d): "access \(e) length \(n) into \(r)" + (d.isEmpty ? "" : " data \(d)")
        case .continuation(let e, let d): "continuation \(e)" + (d.isEmpty ? "" : " data \(d)")
        case .jump(let rip): "jump to 0x" + String(rip, radix: 16)
        }
    }
}

/// Where the mock puts RIP at an access exit.
public enum MockRIPModel: Hashable, Sendable {
    /// This project's development machines (KVM's PVM flavour): after `in` and
    /// MMIO loads RIP is on the instruction until the next `KVM_RUN` completes
    /// it; after `out` and MMIO stores it is already past. A register
    /// write-back before the completion drops the loaded value (RIP still moves).
    case pvm
    /// Hardware KVM (VT-x/SVM, Linux 5.2 and later): `in`, `out` and MMIO loads
    /// are completed, and RIP moved, by the next `KVM_RUN`; MMIO stores are
    /// emulated whole before the exit (RIP past). A register write-back before
    /// the completion keeps the loaded value but RIP moves from the new value.
    case hardware
}

/// A general register a scripted access loads into.
public enum MockRegister: String, Hashable, Sendable, CaseIterable {
    /// RAX (and the target of `in`).
    case rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15

    /// The register's value in `r`.
    public func value(in r: Registers) -> UInt64 {
        switch self {
        case .rax: r.rax
        case .rbx: r.rbx
        case .rcx: r.rcx
        case .rdx: r.rdx
        case .rsi: r.rsi
        case .rdi: r.rdi
        case .rsp: r.rsp
        case .rbp: r.rbp
        case .r8: r.r8
        case .r9: r.r9
        case .r10: r.r10
        case .r11: r.r11
        case .r12: r.r12
        case .r13: r.r13
        case .r14: r.r14
        case .r15: r.r15
        }
    }

    /// Stores `value` into the register in `r`.
    public func set(_ value: UInt64, in r: inout Registers) {
        switch self {
        case .rax: r.rax = value
        case .rbx: r.rbx = value
        case .rcx: r.rcx = value
        case .rdx: r.rdx = value
        case .rsi: r.rsi = value
        case .rdi: r.rdi = value
        case .rsp: r.rsp = value
        case .rbp: r.rbp = value
        case .r8: r.r8 = value
        case .r9: r.r9 = value
        case .r10: r.r10 = value
        case .r11: r.r11 = value
        case .r12: r.r12 = value
        case .r13: r.r13 = value
        case .r14: r.r14 = value
        case .r15: r.r15 = value
        }
    }

    /// Writes a load of `size` bytes into the register in `r` as x86-64 does:
    /// 1 and 2 bytes merge into the low bytes, 4 bytes zero-extend, 8 replace.
    public func load(_ value: UInt64, size: Int, in r: inout Registers) {
        let old = self.value(in: r)
        switch size {
        case 1: set(old & ~0xff | value & 0xff, in: &r)
        case 2: set(old & ~0xffff | value & 0xffff, in: &r)
        case 4: set(value & 0xffff_ffff, in: &r)
        default: set(value, in: &r)
        }
    }
}

/// How the VM stopped when it stopped normally.
public enum StopReason: Hashable, Sendable, CustomStringConvertible {
    /// The guest wrote `status` to the debug-exit port.
    case guestExit(status: UInt32)
    /// Every vCPU executed `hlt` with nothing to wake it.
    case halted
    /// ``VirtualMachine/stop()`` was called.
    case stopped
    /// The guest requested a shutdown, reset or crash through a system event (`KVM_SYSTEM_EVENT_*`).
    case systemEvent(type: UInt32)

    /// A one-line description.
    public var description: String {
        switch self {
        case .guestExit(let s): "guest exited with status \(s)"
        case .halted: "all vCPUs halted"
        case .stopped: "stopped"
        case .systemEvent(let t): "system event \(t)"
        }
    }
}

/// A guest failure the VM cannot continue from, with the vCPU state at that point.
public struct GuestFault: Hashable, Sendable, CustomStringConvertible {
    /// What went wrong.
    public enum Kind: Hashable, Sendable {
        /// The guest shut down (a triple fault).
        case tripleFault
        /// The hypervisor could not emulate an instruction.
        case emulationFailure
        /// Another `KVM_EXIT_INTERNAL_ERROR` sub-error.
        case internalError(suberror: UInt32)
        /// VM entry failed with this hardware reason.
        case failedEntry(reason: UInt64)
    }
    /// What went wrong.
    public var kind: Kind
    /// The vCPU.
    public var vcpu: Int
    /// The general registers, when they could be read.
    public var registers: Registers?
    /// The special registers, when they could be read.
    public var specialRegisters: SpecialRegisters?
    /// Extra data the hypervisor reported (internal errors).
    public var data: [UInt64]

    /// A multi-line description with the register dump.
    public var description: String {
        var s: String
        switch kind {
        case .tripleFault: s = "guest triple fault (shutdown) on vCPU \(vcpu)"
        case .emulationFailure: s = "instruction emulation failure on vCPU \(vcpu)"
        case .internalError(let e): s = "hypervisor internal error \(e) on vCPU \(vcpu)"
        case .failedEntry(let r): s = "VM entry failed (hardware reason 0x\(String(r, radix: 16))) on vCPU \(vcpu)"
        }
        if !data.isEmpty { s += "; data " + data.map { "0x" + String($0, radix: 16) }.joined(separator: " ") }
        if let r = registers { s += "\n" + r.description }
        if let sr = specialRegisters {
            s += "\ncr0=0x\(String(sr.cr0, radix: 16)) cr3=0x\(String(sr.cr3, radix: 16)) cr4=0x\(String(sr.cr4, radix: 16)) efer=0x\(String(sr.efer, radix: 16)) cs=0x\(String(sr.cs.selector, radix: 16)) cpl=\(sr.cpl)"
        }
        return s
    }
}

/// Every error a ``VirtualMachine`` reports.
public enum VMError: Error, Sendable, CustomStringConvertible {
    /// A hypervisor ioctl or system call failed.
    case backend(BackendError)
    /// A guest memory access failed.
    case memory(GuestMemoryError)
    /// A device could not be attached.
    case bus(BusError)
    /// A guest image could not be loaded.
    case loader(LoaderError)
    /// The guest failed (triple fault, emulation failure, ...).
    case guestFault(GuestFault)
    /// No handler consumed an exit.
    case unhandledExit(vcpu: Int, exit: VMExit, rip: UInt64?)
    /// In strict mode: the guest accessed an address no device claims.
    case unclaimedAccess(space: BusSpace, address: UInt64, direction: AccessDirection, vcpu: Int, rip: UInt64?)
    /// The paravirtual ring held guest-written data that is out of range.
    case ring(PVRingError)
    /// A handler tried to set registers while the exit's access was still
    /// pending: complete it first with ``ExitContext/completePendingAccess()``.
    case accessPending(vcpu: Int, exit: VMExit)
    /// The configuration is invalid.
    case invalidConfiguration(String)
    /// The operation is not valid in the VM's current state.
    case invalidState(String)

    /// A one-line (or, for guest faults, multi-line) description.
    public var description: String {
        func hex(_ v: UInt64?) -> String { v.map { "0x" + String($0, radix: 16) } ?? "?" }
        switch self {
        case .backend(let e): return e.description
        case .memory(let e): return e.description
        case .bus(let e): return e.description
        case .loader(let e): return "cannot load guest image: \(e)"
        case .guestFault(let f): return f.description
        case .unhandledExit(let v, let exit, let rip): return "unhandled exit \(exit) on vCPU \(v) at rip \(hex(rip))"
        case .unclaimedAccess(let s, let a, let d, let v, let rip):
            return "unclaimed \(s) \(d) at 0x\(String(a, radix: 16)) by vCPU \(v) at rip \(hex(rip)) (strict mode)"
        case .ring(let e): return e.description
        case .accessPending(let v, let exit):
            return "vCPU \(v): registers set while the access of \(exit) is pending; call completePendingAccess() first"
        case .invalidConfiguration(let s): return "invalid configuration: \(s)"
        case .invalidState(let s): return "invalid state: \(s)"
        }
    }
}

extension VMError {
    /// A memory-slot error as a VM error: backend failures keep their ioctl and errno.
    init(_ error: MemorySlotError) {
        switch error {
        case .backend(let e, _): self = .backend(e)
        case .vmStopping: self = .invalidState(error.description)
        default: self = .invalidConfiguration(error.description)
        }
    }
}

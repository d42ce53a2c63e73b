
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

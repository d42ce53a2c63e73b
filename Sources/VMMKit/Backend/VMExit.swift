/// A VM exit: why `KVM_RUN` returned, with the exit's data.
///
/// Unknown exit reasons arrive as ``unsupported(reason:)`` and never crash.
///
/// Every payload is a plain value (no arrays, strings or classes): passing an
/// exit down the chain copies bytes and touches no reference count.
public enum VMExit: Hashable, Sendable {
    /// Port I/O (`in`, `out`, `ins`, `outs`).
    case io(PortIO)
    /// A load or store to unbacked (or read-only) guest-physical memory.
    case mmio(MMIOAccess)
    /// The vCPU executed `hlt` and no interrupt is pending (no in-kernel irqchip).
    case halt
    /// The guest shut down, e.g. a triple fault.
    case shutdown
    /// VM entry failed; `reason` is the hardware entry failure reason.
    case failEntry(reason: UInt64, cpu: UInt32)
    /// The hypervisor could not continue (emulation failure and others).
    case internalError(InternalError)
    /// A system event: `type` is `KVM_SYSTEM_EVENT_*` (1 shutdown, 2 reset, 3 crash).
    case systemEvent(type: UInt32, flags: UInt64)
    /// A hypercall (`KVM_EXIT_HYPERCALL`): its number and its six argument words, inline.
    /// Supply the return value with ``ExitContext/completeRead(_:at:)``.
    case hypercall(nr: UInt64, args: ExitWords)
    /// A user-space MSR read (`KVM_EXIT_X86_RDMSR`); complete with ``ExitContext/completeRead(_:at:)``.
    case msrRead(index: UInt32)
    /// A user-space MSR write (`KVM_EXIT_X86_WRMSR`).
    case msrWrite(index: UInt32, value: UInt64)
    /// A debug exit (single step, breakpoint).
    case debug(exception: UInt32, pc: UInt64, dr6: UInt64, dr7: UInt64)
    /// `KVM_RUN` returned because of a signal or `immediate_exit` (EINTR), or `KVM_EXIT_INTR`.
    case interrupted
    /// The interrupt window is open (requested with `request_interrupt_window`).
    case irqWindowOpen
    /// An exit this library does not model: `reason` is the raw `KVM_EXIT_*` number.
    case unsupported(reason: UInt32)

    /// The kind of exit, for statistics.
    @inline(__always)
    public var kind: ExitKind {
        switch self {
        case .io: .io
        case .mmio: .mmio
        case .halt: .halt
        case .shutdown: .shutdown
        case .failEntry: .failEntry
        case .internalError: .internalError
        case .systemEvent: .systemEvent
        case .hypercall: .hypercall
        case .msrRead, .msrWrite: .msr
        case .debug: .debug
        case .interrupted: .interrupted
        case .irqWindowOpen: .irqWindowOpen
        case .unsupported: .unsupported
        }
    }
}

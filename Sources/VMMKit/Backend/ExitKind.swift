/// The kinds of ``VMExit``, for per-kind counting.
public enum ExitKind: Int, CaseIterable, Hashable, Sendable, CustomStringConvertible {
    /// ``VMExit/io(_:)``.
    case io
    /// ``VMExit/mmio(_:)``.
    case mmio
    /// ``VMExit/halt``.
    case halt
    /// ``VMExit/shutdown``.
    case shutdown
    /// ``VMExit/failEntry(reason:cpu:)``.
    case failEntry
    /// ``VMExit/internalError(_:)``.
    case internalError
    /// ``VMExit/systemEvent(type:flags:)``.
    case systemEvent
    /// ``VMExit/hypercall(nr:args:)``.
    case hypercall
    /// ``VMExit/msrRead(index:)`` and ``VMExit/msrWrite(index:value:)``.
    case msr
    /// ``VMExit/debug(exception:pc:dr6:dr7:)``.
    case debug
    /// ``VMExit/interrupted``.
    case interrupted
    /// ``VMExit/irqWindowOpen``.
    case irqWindowOpen
    /// ``VMExit/unsupported(reason:)``.
    case unsupported

    /// A short lowercase name (`io`, `mmio`, ...).
    public var description: String {
        switch self {
        case .io: "io"
        case .mmio: "mmio"
        case .halt: "hlt"
        case .shutdown: "shutdown"
        case .failEntry: "fail-entry"
        case .internalError: "internal-error"
        case .systemEvent: "system-event"
        case .hypercall: "hypercall"
        case .msr: "msr"
        case .debug: "debug"
        case .interrupted: "interrupted"
        case .irqWindowOpen: "irq-window"
        case .unsupported: "unsupported"
        }
    }
}

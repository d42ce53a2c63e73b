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

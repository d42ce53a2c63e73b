/// Why a memory-slot change was refused or failed.
public enum MemorySlotError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The range is empty.
    case emptyRange(GuestRange)
    /// The range (rounded out to whole pages) overflows 64 bits.
    case overflow(GuestRange)
    /// The range is not wholly inside one RAM region (it is unbacked, crosses a
    /// hole, or lies in a read-only region, which cannot be guarded or re-carved).
    case notRAM(GuestRange)
    /// The change needs more slots than the hypervisor allows (`KVM_CAP_NR_MEMSLOTS`).
    case outOfSlots(needed: Int, limit: Int)
    /// The VM is stopping: its vCPUs could not be paused for the change.
    case vmStopping
    /// A slot ioctl failed. The change was rolled back when `rolledBack` is true;
    /// otherwise the layout is what ``MemorySlots/slots`` reports.
    case backend(BackendError, rolledBack: Bool)

    /// A one-line description.
    public var description: String {
        switch self {
        case .emptyRange(let r): "memory slot change: \(r) is empty"
        case .overflow(let r): "memory slot change: \(r) overflows when rounded to pages"
        case .notRAM(let r): "memory slot change: \(r) is not inside one RAM region"
        case .outOfSlots(let n, let l): "memory slot change needs \(n) slots; the hypervisor allows \(l)"
        case .vmStopping: "memory slot change: the VM is stopping"
        case .backend(let e, let rb): "memory slot change failed: \(e)" + (rb ? " (rolled back)" : " (not rolled back)")
        }
    }
}

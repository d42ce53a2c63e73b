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

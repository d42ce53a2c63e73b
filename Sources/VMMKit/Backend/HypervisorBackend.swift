/// A hypervisor that can create virtual machines: the real KVM backend
/// (``KVMSystem``) or the mock backend of the `VMMKitTesting` module.
public protocol HypervisorBackend: AnyObject, Sendable {
    /// A short name for diagnostics (`kvm`, `mock`).
    var name: String { get }
    /// Creates an empty virtual machine. The corresponding ioctl is `KVM_CREATE_VM`.
    func createVM() throws(BackendError) -> any VMBackend
}

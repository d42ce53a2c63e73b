/// How the VM lets the slot manager change slots: with every vCPU out of
/// `KVM_RUN` (paused) or not running at all. ``VirtualMachine`` implements it.
package protocol MemorySlotGate: AnyObject {
    /// Whether any vCPU thread may be inside `KVM_RUN` (the VM runs and not every vCPU has finished).
    var vcpusMayRun: Bool { get }
    /// Pauses every vCPU (pending accesses completed); false when the VM is stopping or stopped.
    func pauseForSlotChange() -> Bool
    /// Resumes after ``pauseForSlotChange()`` returned true.
    func resumeAfterSlotChange()
}

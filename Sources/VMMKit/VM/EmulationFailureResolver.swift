/// Tells which guest-physical bytes an instruction KVM could not emulate
/// writes, so that only failures at guarded pages reach the
/// ``PageGuardListener``. VMMKit does not decode x86; the `X86Disassembler`
/// module provides one (`X86EmulationFailureResolver`).
public protocol EmulationFailureResolver: AnyObject, Sendable {
    /// The guest-physical ranges (one per page) the instruction at
    /// `failure.rip` writes, empty when it writes no memory, or `nil` when
    /// that cannot be told (undecodable bytes, an unmapped page). Called on
    /// the vCPU's thread with the VM's vCPUs running.
    func writes(of failure: GuardedEmulationFailure, context: ExitContext) -> [GuestRange]?
}

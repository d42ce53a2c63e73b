/// What a handler did with an exit.
public enum ExitResult: Hashable, Sendable {
    /// The exit is consumed; the vCPU runs on.
    case handled
    /// Not consumed: the next handler in the chain sees it.
    case pass
    /// Consumed, and this vCPU stops (it halted); the VM stops when every vCPU has.
    case stopVCPU
    /// Consumed, and the whole VM stops with this reason.
    case stopVM(StopReason)
}

/// A middleware in a vCPU's exit chain.
///
/// Each exit goes through the chain in order. A handler either consumes the
/// exit (returns anything but ``ExitResult/pass``) or passes it on. A handler
/// that wants to act around the rest of the chain (count, time, observe the
/// outcome) calls ``ExitContext/forward(_:)`` and returns its result.
///
/// Handlers run on vCPU threads; one handler instance is shared by all vCPUs
/// of a VM, so state it keeps must be per vCPU (indexed by
/// ``ExitContext/vcpuID``) or behind a lock.
/// The hot path must not allocate.
public protocol ExitHandler: AnyObject {
    /// Handles or passes on one exit.
    func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult
    /// Called once on each VM stop, after every vCPU has left `KVM_RUN` (flush buffers, drain rings).
    func vmDidStop(_ vm: VirtualMachine) throws(VMError)
    /// The kinds of exit the handler acts on, read once when the VM starts;
    /// the chain does not call it for other kinds, exactly as if it had
    /// returned ``ExitResult/pass`` (one call fewer per exit). `nil`, the
    /// default, means every kind.
    var exitKinds: Set<ExitKind>? { get }
}

extension ExitHandler {
    /// Every kind by default.
    public var exitKinds: Set<ExitKind>? { nil }

    /// Does nothing by default.
    public func vmDidStop(_ vm: VirtualMachine) throws(VMError) {}
}

/// A handler made from a closure, for small VMMs and tests.
public final class ClosureExitHandler: ExitHandler {
    private let body: @Sendable (VMExit, ExitContext) throws(VMError) -> ExitResult
    /// Wraps `body`. It runs on vCPU threads, hence `@Sendable` (a closure
    /// written in top-level code would otherwise be main-actor isolated and
    /// trap when a vCPU thread calls it).
    public init(_ body: @escaping @Sendable (VMExit, ExitContext) throws(VMError) -> ExitResult) { self.body = body }
    /// Calls the closure.
    public func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult { try body(exit, context) }
}

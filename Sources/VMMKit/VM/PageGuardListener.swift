/// A write that landed in a guarded page (see ``MemorySlots/protect(_:)``).
public struct GuardedWrite: Hashable, Sendable {
    /// Who wrote.
    public enum Source: Hashable, Sendable {
        /// A guest store on this vCPU; it exited as an MMIO write, was applied, and the guest ran on.
        case guest(vcpu: Int)
        /// The host (a device's DMA, a loader, the VMM) through a ``GuestMemory`` write.
        case host
    }
    /// The bytes written (already in memory when the listener hears of it).
    public var range: GuestRange
    /// Who wrote.
    public var source: Source

    /// Creates a record.
    public init(range: GuestRange, source: Source) { self.range = range; self.source = source }
}

/// An instruction KVM could not emulate (`KVM_EXIT_INTERNAL_ERROR`, suberror 1)
/// while pages were guarded: typically a store KVM cannot emulate (a VEX or
/// `movq` store, `xsave`) into a guarded page, with RIP on the instruction.
public struct GuardedEmulationFailure: Hashable, Sendable {
    /// The vCPU.
    public var vcpu: Int
    /// RIP at the exit (on the failing instruction).
    public var rip: UInt64
    /// The instruction bytes KVM reported (empty when it reported none).
    public var instructionBytes: [UInt8]
    /// The raw exit.
    public var error: InternalError
    /// The guest-physical bytes the failing instruction writes, one range per
    /// page, when an ``EmulationFailureResolver`` could tell; `nil` when unknown.
    public var writes: [GuestRange]?

    /// How many times in a row one vCPU may re-run the same failing instruction.
    public static let retryLimit = 16

    /// Creates a record.
    public init(vcpu: Int, rip: UInt64, instructionBytes: [UInt8], error: InternalError, writes: [GuestRange]? = nil) {
        self.vcpu = vcpu; self.rip = rip; self.instructionBytes = instructionBytes; self.error = error; self.writes = writes
    }
}

/// What to do after a ``GuardedEmulationFailure``.
public enum GuardDecision: Hashable, Sendable {
    /// Run the vCPU again (after the listener unguarded the page or otherwise
    /// made the instruction runnable). Re-running the same failing instruction
    /// more than ``GuardedEmulationFailure/retryLimit`` times in a row fails the VM.
    case retry
    /// Fail the VM with the emulation failure, as without guards.
    case fail
}

/// Hears about writes into guarded pages (DMP unpatches from here).
///
/// Calls arrive on the writing thread. For a guest write that is the vCPU's
/// thread, inside its exit handling: the listener may call
/// ``MemorySlots/unprotect(_:)`` (and ``VirtualMachine/pauseAll()``) there.
/// For a host write it is whatever thread wrote, possibly a device holding its
/// own lock: record the write and act later; do not pause or unprotect there.
public protocol PageGuardListener: AnyObject, Sendable {
    /// Bytes were written into a guarded page, and are already in memory.
    /// `context` is the writing vCPU's context for a guest write, `nil` for a host write.
    func guardedWrite(_ write: GuardedWrite, context: ExitContext?)
    /// An instruction KVM could not emulate while pages were guarded. With an
    /// ``EmulationFailureResolver`` installed, only failures whose writes touch
    /// a guarded page (or cannot be resolved) arrive here, with
    /// ``GuardedEmulationFailure/writes`` filled in; without one (VMMKit does
    /// not decode instructions) every failure while pages are guarded arrives
    /// and the listener decides.
    func guardedEmulationFailure(_ failure: GuardedEmulationFailure, context: ExitContext) -> GuardDecision
}

extension PageGuardListener {
    /// Fails the VM, as without guards.
    public func guardedEmulationFailure(_ failure: GuardedEmulationFailure, context: ExitContext) -> GuardDecision { .fail }
}

/// A ``PageGuardListener`` made from closures, for small VMMs and tests.
public final class ClosurePageGuardListener: PageGuardListener {
    private let onWrite: @Sendable (GuardedWrite, ExitContext?) -> Void
    private let onFailure: @Sendable (GuardedEmulationFailure, ExitContext) -> GuardDecision

    /// Wraps the closures (they run on the writing thread).
    public init(onWrite: @escaping @Sendable (GuardedWrite, ExitContext?) -> Void,
                onEmulationFailure: @escaping @Sendable (GuardedEmulationFailure, ExitContext) -> GuardDecision = { _, _ in .fail }) {
        self.onWrite = onWrite
        self.onFailure = onEmulationFailure
    }
    /// Calls the write closure.
    public func guardedWrite(_ write: GuardedWrite, context: ExitContext?) { onWrite(write, context) }
    /// Calls the emulation-failure closure.
    public func guardedEmulationFailure(_ failure: GuardedEmulationFailure, context: ExitContext) -> GuardDecision {
        onFailure(failure, context)
    }
}

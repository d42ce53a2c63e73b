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

/// Holds the VM's guard listener and resolver (set at any time, read on vCPU threads).
final class GuardListenerBox: @unchecked Sendable {
    private let lock = ConditionLock()
    private var listener: (any PageGuardListener)?
    private var resolver: (any EmulationFailureResolver)?
    var current: (any PageGuardListener)? { lock.withLock { listener } }
    var currentResolver: (any EmulationFailureResolver)? { lock.withLock { resolver } }
    func set(_ l: (any PageGuardListener)?) { lock.withLock { listener = l } }
    func set(resolver r: (any EmulationFailureResolver)?) { lock.withLock { resolver = r } }
}

/// The built-in first handler of every chain: applies guest writes into
/// guarded pages and reports them, and hands emulation failures to the
/// listener while pages are guarded.
///
/// A write into a read-only slot exits as an MMIO write with RIP already past
/// the store and memory untouched. When the address is RAM (not a read-only
/// region) the store can only be a guarded one — or the next fragment of one
/// whose page was unguarded meanwhile — so it is applied to memory and the
/// guest runs on. KVM splits a store that crosses a page boundary into one
/// fragment per page (a fragment in a writable page is written by KVM itself),
/// so each exit covers bytes of one page.
final class PageGuardHandler: ExitHandler {
    private let memory: GuestMemory
    private let slots: MemorySlots
    private let listeners: GuardListenerBox
    /// Per vCPU: (RIP, exit count) of the last failure handed to the listener, and the streak.
    private let streaks: UnsafeMutableBufferPointer<(rip: UInt64, total: Int, count: Int)>

    init(memory: GuestMemory, slots: MemorySlots, listeners: GuardListenerBox, vcpuCount: Int) {
        self.memory = memory
        self.slots = slots
        self.listeners = listeners
        streaks = .allocate(capacity: max(1, vcpuCount))
        streaks.initialize(repeating: (0, -2, 0))
    }

    deinit { streaks.deallocate() }

    /// Applies and reports guarded writes; passes every other exit on.
    func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
        switch exit {
        case .mmio(let m):
            guard m.direction == .write, memory.guardsEverUsed,
                  let region = memory.region(containing: m.address), !region.readOnly else { return .pass }
            let written: GuestRange
            do { written = try memory.applyGuestStore(m.value, size: Int(m.size), at: m.address) }
            catch { return .pass }
            slots.noteGuestWrite(written)
            listeners.current?.guardedWrite(GuardedWrite(range: written, source: .guest(vcpu: context.vcpuID)), context: context)
            return .handled
        case .internalError(let ie):
            guard ie.isEmulationFailure, memory.hasProtectedPages, let listener = listeners.current else { return .pass }
            let rip = (try? context.registers().rip) ?? 0
            let id = context.vcpuID
            guard id >= 0, id < streaks.count else { return .pass }
            let total = context.statistics.total
            var s = streaks[id]
            s = (s.rip == rip && s.total == total - 1) ? (rip, total, s.count + 1) : (rip, total, 1)
            streaks[id] = s
            guard s.count <= GuardedEmulationFailure.retryLimit else { return .pass }
            var failure = GuardedEmulationFailure(vcpu: id, rip: rip, instructionBytes: ie.instructionBytes, error: ie)
            if let resolver = listeners.currentResolver {
                failure.writes = resolver.writes(of: failure, context: context)
                // Resolved, and no byte in a guarded page: not the guards' business.
                if let w = failure.writes, !w.contains(where: { memory.isProtected($0.start, length: $0.size) }) { return .pass }
            }
            return listener.guardedEmulationFailure(failure, context: context) == .retry ? .handled : .pass
        default:
            return .pass
        }
    }
}

extension InternalError {
    /// For an emulation failure that carries them (`KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`),
    /// the instruction bytes KVM could not emulate; empty otherwise.
    public var instructionBytes: [UInt8] {
        // struct emulation_failure: data[0] = flags; then insn_size (1 byte) and insn_bytes[15].
        guard isEmulationFailure, data.count >= 3, data[0] & 1 != 0 else { return [] }
        var raw: [UInt8] = []
        for w in data[1...2] { for i in 0..<8 { raw.append(UInt8(truncatingIfNeeded: w >> (8 * UInt64(i)))) } }
        let n = min(Int(raw[0]), 15)
        return Array(raw[1..<(1 + n)])
    }
}

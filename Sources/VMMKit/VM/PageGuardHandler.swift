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

    /// Guarded writes exit as MMIO writes; emulation failures as internal errors.
    var exitKinds: Set<ExitKind>? { [.mmio, .internalError] }

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

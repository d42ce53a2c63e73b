/// The per-vCPU state a handler sees: the vCPU's registers, the exit's data,
/// guest memory, the bus and the rest of the chain. Not `Sendable`: it belongs
/// to the vCPU's thread.
///
/// ## Pending accesses
///
/// After a port I/O, MMIO, MSR or hypercall exit, KVM finishes the exiting
/// instruction only when the vCPU runs again: it stores the value supplied
/// with ``completeRead(_:at:)`` into the guest's register and moves RIP past
/// the instruction (on some hosts and for some accesses RIP is already past at
/// the exit; see Architecture.md, "Where RIP points at an exit"). Until then
/// the access is *pending* (``hasPendingAccess``). A handler can finish it on
/// the spot with ``completePendingAccess()`` and compare RIP before and after
/// (bracketing). ``setRegisters(_:)`` refuses to run while an access is
/// pending: a register write-back before the completion silently drops the
/// loaded value on some hosts and moves RIP twice on others.
public final class ExitContext {
    /// The vCPU index.
    public let vcpuID: Int
    /// The VM (memory, bus, devices).
    public unowned let vm: VirtualMachine
    let backend: any VCPUBackend
    /// The chain, one retained box per handler in a buffer the context owns:
    /// a handler is called through its box's `let` with the box borrowed
    /// (`_withUnsafeGuaranteedRef`), so no call retains or releases it (a
    /// reference loaded from a buffer would be retained around the call).
    private let handlers: UnsafeMutableBufferPointer<Unmanaged<HandlerBox>>
    @exclusivity(unchecked) private var cursor = 0
    /// The index of the handler running now (-1: none).
    @exclusivity(unchecked) private var running = -1
    /// The error a handler just threw, on its way out of ``runRest(_:)``.
    @exclusivity(unchecked) private var handlerError: VMError?
    /// Per handler, for the current exit: what its first ``forward(_:)`` returned.
    private let forwarded: UnsafeMutableBufferPointer<ExitResult?>
    @exclusivity(unchecked) private var anyForwarded = false
    /// Guest memory.
    public let memory: GuestMemory
    /// The I/O bus.
    public let bus: IOBus
    /// Whether coalesced zones were registered when the VM started.
    let drainsCoalesced: Bool
    private let control: Control

    /// Exit counts by ``ExitKind/rawValue`` (only this vCPU's thread writes them).
    private let kindCounts: UnsafeMutablePointer<Int>
    /// Per-site counts, when site collection is on.
    let siteTable: ExitSiteTable?

    /// Whether the current exit's access still waits for KVM to complete it.
    @exclusivity(unchecked) public private(set) var hasPendingAccess = false
    /// Whether the chain is handling a further exit that KVM returned while
    /// ``completePendingAccess()`` completed an earlier one (the next element
    /// of a string I/O instruction, the second half of a split MMIO access).
    @exclusivity(unchecked) public private(set) var isCompletingAccess = false
    /// The exit being handled (for the site resolver and bracketing).
    @exclusivity(unchecked) private(set) var currentExit: VMExit = .interrupted
    /// RIP as reported at the current exit, when it was read (site collection, bracketing).
    @exclusivity(unchecked) var ripAtExit: UInt64?
    /// RIP after ``completePendingAccess()`` completed the current exit's access.
    @exclusivity(unchecked) var ripAfterCompletion: UInt64?
    /// A stop or error raised by a further exit during a completion: it ends the
    /// vCPU once the handler that asked for the completion returns.
    @exclusivity(unchecked) var deferredOutcome: Control.Outcome? {
        didSet { hasDeferredOutcome = deferredOutcome != nil }
    }
    /// Whether ``deferredOutcome`` is set (a cheap check for the exit path).
    @exclusivity(unchecked) private(set) var hasDeferredOutcome = false
    /// Translations of instruction pages, per CR3 and page (see ``resolveSite()``).
    var siteCache = SiteTranslationCache()

    init(vcpuID: Int, vm: VirtualMachine, backend: any VCPUBackend, handlers: [any ExitHandler], collectSites: Bool) {
        self.vcpuID = vcpuID
        self.vm = vm
        self.backend = backend
        self.handlers = .allocate(capacity: handlers.count)
        _ = self.handlers.initialize(from: handlers.map { Unmanaged.passRetained(HandlerBox($0)) })
        self.forwarded = .allocate(capacity: handlers.count)
        self.forwarded.initialize(repeating: nil)
        self.memory = vm.memory
        self.bus = vm.bus
        self.drainsCoalesced = vm.hasCoalescedZones
        self.control = vm.control
        kindCounts = .allocate(capacity: ExitKind.allCases.count)
        kindCounts.initialize(repeating: 0, count: ExitKind.allCases.count)
        siteTable = collectSites ? ExitSiteTable(capacity: ExitStatistics.siteLimit) : nil
    }

    deinit {
        kindCounts.deallocate()
        for h in handlers { h.release() }
        handlers.deinitialize().deallocate()
        forwarded.deinitialize().deallocate()
    }

    /// This vCPU's exit statistics: a snapshot of its counters (read it on the
    /// vCPU's thread, or while the VM is stopped or paused).
    public var statistics: ExitStatistics {
        var s = ExitStatistics(collectSites: siteTable != nil)
        for k in ExitKind.allCases { s.add(k, count: kindCounts[k.rawValue]) }
        if let t = siteTable {
            for (site, n) in t.sites { s.add(site: site, count: n) }
            s.addUntracked(t.overflow)
        }
        return s
    }

    /// How many exits of `kind` this vCPU took (cheap: no snapshot).
    @inline(__always)
    public func exitCount(_ kind: ExitKind) -> Int { kindCounts[kind.rawValue] }

    /// How many exits of every kind but ``ExitKind/interrupted`` this vCPU took (cheap: no snapshot).
    public var totalExits: Int {
        var n = 0
        for k in ExitKind.allCases where k != .interrupted { n &+= kindCounts[k.rawValue] }
        return n
    }

    @inline(__always)
    func count(_ kind: ExitKind) { kindCounts[kind.rawValue] &+= 1 }

    /// Counts an `EINTR` (or `KVM_EXIT_INTR`) return: KVM_RUN ran, so nothing is pending any more.
    @inline(__always)
    func countInterrupted() {
        kindCounts[ExitKind.interrupted.rawValue] &+= 1
        hasPendingAccess = false
    }

    /// The vCPU's general registers (from sync regs: no ioctl on KVM).
    public func registers() throws(VMError) -> Registers {
        do { return try backend.registers() } catch { throw .backend(error) }
    }

    /// Sets the vCPU's general registers.
    ///
    /// - Throws: ``VMError/accessPending(vcpu:exit:)`` while the current exit's
    ///   access is pending (``hasPendingAccess``): call
    ///   ``completePendingAccess()`` first and change the registers it returns.
    ///   Writing registers back before the completion drops an `in`/MMIO-load
    ///   value on some hosts and advances RIP a second time on others.
    public func setRegisters(_ r: Registers) throws(VMError) {
        if hasPendingAccess { throw .accessPending(vcpu: vcpuID, exit: currentExit) }
        do { try backend.setRegisters(r) } catch { throw .backend(error) }
    }

    /// The vCPU's special registers (an ioctl on KVM: keep it off the hot path).
    public func specialRegisters() throws(VMError) -> SpecialRegisters {
        do { return try backend.specialRegisters() } catch { throw .backend(error) }
    }
    /// Element `index` of the exit's data (string I/O elements; MMIO store value at 0).
    @inline(__always)
    public func ioData(at index: Int) -> UInt64 { backend.exitData(at: index) }
    /// Supplies element `index` of what a read (`in`, MMIO load, MSR read) returns to the guest.
    @inline(__always)
    public func completeRead(_ value: UInt64, at index: Int = 0) { backend.setExitData(value, at: index) }

    /// Fails the current MSR exit: the guest gets #GP.
    @inline(__always)
    public func rejectMSRAccess() { backend.rejectMSRAccess() }

    /// Runs the rest of the chain (the handlers after the current one) on `exit`.
    ///
    /// The rest of the chain runs once per exit: a handler's second `forward`
    /// runs no handler and returns what its first one returned, so no exit is
    /// handled twice. A handler that forwarded ends the chain with its own
    /// result, even ``ExitResult/pass``: the handlers after it have had the exit.
    public func forward(_ exit: VMExit) throws(VMError) -> ExitResult {
        let caller = running
        if caller >= 0, let first = forwarded[caller] { return first }
        let r = try runRest(exit)
        if caller >= 0 {
            forwarded[caller] = r
            anyForwarded = true
        }
        return r
    }

    /// Runs the handlers from `cursor` on until one consumes the exit or forwarded it.
    @inline(__always)
    private func runRest(_ exit: VMExit) throws(VMError) -> ExitResult {
        let caller = running
        defer { running = caller }
        let count = handlers.count
        guard let base = handlers.baseAddress else { return .pass }
        let kind: UInt64 = 1 << UInt64(exit.kind.rawValue)
        while cursor < count {
            let i = cursor
            cursor += 1
            // A handler that does not act on this kind of exit passes it on: skip the call.
            if base[i]._withUnsafeGuaranteedRef({ $0.kinds }) & kind == 0 { continue }
            running = i
            // Called through the borrowed box: the handler is not retained.
            // `_withUnsafeGuaranteedRef` rethrows untyped errors, and a Result of
            // the large VMError costs copies on every call: the error goes out
            // through `handlerError` instead.
            var failed = false
            let r = base[i]._withUnsafeGuaranteedRef { box -> ExitResult in
                do throws(VMError) { return try box.handler.handle(exit, context: self) } catch {
                    handlerError = error
                    failed = true
                    return .pass
                }
            }
            if failed, let e = handlerError {
                handlerError = nil
                throw e
            }
            if r != .pass || forwarded[i] != nil { return r }
        }
        return .pass
    }

    /// The most string I/O one exit carries on KVM (its one-page `pio_data` area).
    static let maximumStringIOBytes = 4096

    @inline(__always)
    func dispatch(_ exit: VMExit) throws(VMError) -> ExitResult {
        // KVM never reports more string I/O elements than fit its data page. A
        // backend that did would keep this vCPU in handlers' per-element loops
        // for as long as it likes, out of stop()'s reach: refuse it up front.
        if case .io(let io) = exit, Int(io.count) * max(1, Int(io.size)) > ExitContext.maximumStringIOBytes {
            throw .invalidState("port I/O exit with \(io.count) elements of \(io.size) bytes: more than the \(ExitContext.maximumStringIOBytes)-byte data page KVM uses")
        }
        cursor = 0
        running = -1
        if anyForwarded {
            for i in forwarded.indices { forwarded[i] = nil }
            anyForwarded = false
        }
        return try runRest(exit)
    }

    /// Where the chain stands for the exit being handled, saved around the
    /// dispatch of a further exit during a completion.
    private struct ChainState {
        var cursor: Int
        var running: Int
        var forwarded: [ExitResult?]?
    }

    private func saveChain() -> ChainState {
        ChainState(cursor: cursor, running: running, forwarded: anyForwarded ? Array(forwarded) : nil)
    }

    private func restoreChain(_ c: ChainState) {
        cursor = c.cursor
        running = c.running
        if let f = c.forwarded {
            for i in forwarded.indices { forwarded[i] = f[i] }
            anyForwarded = true
        } else if anyForwarded {
            for i in forwarded.indices { forwarded[i] = nil }
            anyForwarded = false
        }
    }

    // MARK: completing the pending access

    /// Completes the current exit's access now and returns the registers after it.
    ///
    /// Supply read data (``completeRead(_:at:)``) first: KVM stores it into the
    /// guest's register during this call. Runs `KVM_RUN` with `immediate_exit`
    /// set, which makes KVM finish the pending instruction — register loaded,
    /// RIP past the instruction — without running guest code. With RIP read
    /// before (``registers()``), `[before, after)` is the instruction when RIP
    /// moved; when it did not, RIP was already past the instruction at the exit.
    ///
    /// Finishing the instruction can need more user-space work: the next
    /// element of a string I/O instruction, the second half of an MMIO access
    /// split across pages. KVM then returns a further exit, which is counted
    /// and dispatched through the whole chain, this handler included, with
    /// ``isCompletingAccess`` set (a handler that brackets should check it and
    /// just handle the access). The loop continues while each further exit
    /// continues the same instruction (port I/O on the same port, width and
    /// direction; MMIO), so a long split `rep ins`/`rep outs` completes
    /// whole; it ends early only when the VM is asked to stop, leaving the
    /// rest pending (``hasPendingAccess`` stays true). A stop or halt a
    /// further exit's handler asks for takes effect when the current handler
    /// returns; an error it throws is thrown from here and also ends the vCPU.
    ///
    /// Without a pending access it runs nothing and returns the registers.
    ///
    /// - Throws: a failing `KVM_RUN` (``VMError/backend(_:)``), an error of a
    ///   further exit's handler, or ``VMError/invalidState(_:)`` when called
    ///   from the handler of a further exit (``isCompletingAccess``).
    @discardableResult
    public func completePendingAccess() throws(VMError) -> Registers {
        guard !isCompletingAccess else {
            throw .invalidState("completePendingAccess() called while completing an access (from a handler of a further exit)")
        }
        guard hasPendingAccess else { return try registers() }
        _ = try exitRIP() // remembered for resolveSite()
        try runCompletion()
        if case .error(let e)? = deferredOutcome { throw e }
        let after = try registers()
        if !hasPendingAccess { ripAfterCompletion = after.rip }
        return after
    }

    /// RIP as reported at the current exit (read once, then remembered).
    func exitRIP() throws(VMError) -> UInt64 {
        if let r = ripAtExit { return r }
        let r: UInt64
        do { r = try backend.instructionPointer() } catch { throw .backend(error) }
        ripAtExit = r
        return r
    }

    /// The completion loop shared by ``completePendingAccess()`` and the run
    /// loop's stop and pause paths. Further exits are counted, dispatched
    /// (their stop or error recorded in ``deferredOutcome``), and followed
    /// while they continue the same instruction.
    func runCompletion() throws(VMError) {
        guard hasPendingAccess else { return }
        let chain = saveChain()
        backend.setImmediateExit(true)
        isCompletingAccess = true
        defer {
            isCompletingAccess = false
            backend.setImmediateExit(false)
            restoreChain(chain)
        }
        var previous = currentExit
        while hasPendingAccess {
            let e: VMExit
            do { e = try backend.run() } catch { throw .backend(error) }
            hasPendingAccess = false
            if case .interrupted = e { return }
            // KVM entered no guest code: this exit belongs to the pending instruction.
            begin(e)
            let out: Control.Outcome?
            do { out = ExitContext.outcome(try dispatchCounted(e)) } catch { out = .error(error) }
            if let out {
                if deferredOutcome == nil || out.isError && !(deferredOutcome?.isError ?? false) { deferredOutcome = out }
                if out.isError { return }
            }
            guard ExitContext.continues(e, previous), !control.stopRequested else { return }
            previous = e
        }
    }

    /// Whether `next` continues the instruction that exited with `previous`.
    static func continues(_ next: VMExit, _ previous: VMExit) -> Bool {
        switch (next, previous) {
        case (.io(let a), .io(let b)): a.port == b.port && a.size == b.size && a.direction == b.direction
        case (.mmio, .mmio): true
        default: false
        }
    }

    /// Whether KVM completes `exit` on the next `KVM_RUN` (stores read data, moves RIP).
    @inline(__always)
    static func needsCompletion(_ exit: VMExit) -> Bool {
        switch exit {
        case .io, .mmio, .msrRead, .msrWrite, .hypercall, .unsupported: true
        default: false
        }
    }

    /// Records `exit` as the current one.
    @inline(__always)
    func begin(_ exit: VMExit) {
        currentExit = exit
        ripAtExit = nil
        ripAfterCompletion = nil
        hasPendingAccess = ExitContext.needsCompletion(exit)
    }

    /// Counts `exit` and dispatches it through the chain. An exit every
    /// handler passed throws ``VMError/unhandledExit(vcpu:exit:rip:)``, so the
    /// result is never ``ExitResult/pass``. (A small result and typed throws keep
    /// the common case, `.handled`, free of the large `Control.Outcome`.)
    @inline(__always)
    func dispatchCounted(_ exit: VMExit) throws(VMError) -> ExitResult {
        if drainsCoalesced { vm.drainCoalesced(backend) }
        count(exit.kind)
        if let t = siteTable, let rip = try? backend.registers().rip {
            ripAtExit = rip
            t.record(ExitStatistics.site(for: exit, rip: rip))
        }
        let r = try dispatch(exit)
        if case .pass = r { throw .unhandledExit(vcpu: vcpuID, exit: exit, rip: try? backend.registers().rip) }
        return r
    }

    /// How the vCPU must stop after `result`, if it must.
    static func outcome(_ result: ExitResult) -> Control.Outcome? {
        switch result {
        case .handled, .pass: nil
        case .stopVCPU: .halted
        case .stopVM(let reason): .stop(reason)
        }
    }

    /// Takes the outcome a further exit recorded during a completion, if any.
    @inline(__always)
    func takeDeferredOutcome() -> Control.Outcome? {
        guard hasDeferredOutcome, let o = deferredOutcome else { return nil }
        deferredOutcome = nil
        return o
    }
}

/// One handler of a chain, boxed so the exit path can borrow it (see ``ExitContext``).
final class HandlerBox {
    let handler: any ExitHandler
    /// Bit ``ExitKind/rawValue`` set for each kind the handler acts on (``ExitHandler/exitKinds``).
    let kinds: UInt64
    init(_ handler: any ExitHandler) {
        self.handler = handler
        kinds = handler.exitKinds.map { HandlerBox.mask($0) } ?? ~0
    }

    static func mask(_ kinds: Set<ExitKind>) -> UInt64 { kinds.reduce(0) { $0 | 1 << UInt64($1.rawValue) } }
}

extension Control.Outcome {
    var isError: Bool { if case .error = self { true } else { false } }
}

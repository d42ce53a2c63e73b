/// The per-vCPU state a handler sees: the vCPU's registers, the exit's data,
/// guest memory, the bus and the rest of the chain. Not `Sendable`: it belongs
/// to the vCPU's thread.
public final class ExitContext {
    /// The vCPU index.
    public let vcpuID: Int
    /// The VM (memory, bus, devices).
    public unowned let vm: VirtualMachine
    let backend: any VCPUBackend
    private let handlers: [any ExitHandler]
    @exclusivity(unchecked) private var cursor = 0
    /// The index of the handler running now (-1: none).
    @exclusivity(unchecked) private var running = -1
    /// Per handler, for the current exit: what its first ``forward(_:)`` returned.
    @exclusivity(unchecked) private var forwarded: [ExitResult?]
    @exclusivity(unchecked) private var anyForwarded = false
    /// This vCPU's exit statistics (only this vCPU's thread writes them).
    @exclusivity(unchecked) public internal(set) var statistics: ExitStatistics
    /// Guest memory.
    public let memory: GuestMemory
    /// The I/O bus.
    public let bus: IOBus
    /// Whether coalesced zones were registered when the VM started.
    let drainsCoalesced: Bool

    init(vcpuID: Int, vm: VirtualMachine, backend: any VCPUBackend, handlers: [any ExitHandler], collectSites: Bool) {
        self.vcpuID = vcpuID
        self.vm = vm
        self.backend = backend
        self.handlers = handlers
        self.forwarded = Array(repeating: nil, count: handlers.count)
        self.statistics = ExitStatistics(collectSites: collectSites)
        self.memory = vm.memory
        self.bus = vm.bus
        self.drainsCoalesced = vm.hasCoalescedZones
    }

    /// The vCPU's general registers (from sync regs: no ioctl on KVM).
    public func registers() throws(VMError) -> Registers {
        do { return try backend.registers() } catch { throw .backend(error) }
    }
    /// Sets the vCPU's general registers.
    public func setRegisters(_ r: Registers) throws(VMError) {
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
        while cursor < handlers.count {
            let i = cursor
            cursor += 1
            running = i
            let r = try handlers[i].handle(exit, context: self)
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
}

/// One virtual CPU. ``VirtualMachine`` runs each on its own thread.
public final class VCPU: @unchecked Sendable {
    /// The vCPU index (also its initial APIC ID).
    public let id: Int
    /// The backend vCPU (registers, state get/set). Use from the vCPU thread
    /// while running, or from any thread while the VM is stopped or paused.
    public let backend: any VCPUBackend
    /// The exit context of the current or last run.
    public internal(set) var context: ExitContext?

    init(id: Int, backend: any VCPUBackend) {
        self.id = id
        self.backend = backend
    }

    /// The vCPU's general registers (when the VM is stopped or paused).
    public func registers() throws(VMError) -> Registers {
        do { return try backend.registers() } catch { throw .backend(error) }
    }

    /// The vCPU's special registers (when the VM is stopped or paused).
    public func specialRegisters() throws(VMError) -> SpecialRegisters {
        do { return try backend.specialRegisters() } catch { throw .backend(error) }
    }

    /// The run loop: `KVM_RUN`, dispatch the exit through the chain, repeat.
    func runLoop(vm: VirtualMachine) -> Control.Outcome {
        guard let ctx = context else { return .error(.invalidState("vCPU \(id) has no context")) }
        backend.bindToCurrentThread()
        Sys.setThreadTag(vm)
        defer { Sys.clearThreadTag() }
        let control = vm.control
        while true {
            if control.requests.load(ordering: .acquiring) != 0 {
                if control.stopRequested { return completed(.stop(.stopped), ctx) }
                // Pause: complete any pending access first (further exits are
                // dispatched like any other), then park.
                do { try ctx.runCompletion() } catch { return .error(error) }
                if let out = ctx.takeDeferredOutcome() { return out.isError ? out : completed(out, ctx) }
                control.park()
                // Whoever held the pause may have rewritten guest code (DMP):
                // serialize before re-entering the guest (cross-modifying code).
                Sys.serialize()
                backend.setImmediateExit(false)
                continue
            }
            let exit: VMExit
            do { exit = try backend.run() } catch { return .error(.backend(error)) }
            if case .interrupted = exit {
                ctx.countInterrupted()
                backend.setImmediateExit(false)
                continue
            }
            ctx.begin(exit)
            let result: ExitResult
            do { result = try ctx.dispatchCounted(exit) } catch {
                // A further exit of a completion that failed first wins.
                if let deferred = ctx.takeDeferredOutcome(), deferred.isError { return deferred }
                return .error(error)
            }
            if ctx.hasDeferredOutcome, let deferred = ctx.takeDeferredOutcome() {
                // A further exit of a completion asked to stop (or failed).
                return deferred.isError ? deferred : completed(deferred, ctx)
            }
            switch result {
            case .handled, .pass: continue
            case .stopVCPU: return completed(.halted, ctx)
            case .stopVM(let reason): return completed(.stop(reason), ctx)
            }
        }
    }

    /// Before the vCPU leaves after a handled exit: let KVM finish the pending
    /// access (write an `in`/MMIO-load result into the register, advance RIP)
    /// with the completion loop of ``ExitContext/completePendingAccess()``, so
    /// the state read after the stop is final and a later run does not replay
    /// the old access. A failure to complete becomes the vCPU's outcome.
    private func completed(_ outcome: Control.Outcome, _ ctx: ExitContext) -> Control.Outcome {
        do { try ctx.runCompletion() } catch { return .error(error) }
        if let later = ctx.takeDeferredOutcome(), later.isError { return later }
        return outcome
    }
}

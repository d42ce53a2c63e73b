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
        let collectSites = ctx.statistics.collectSites
        while true {
            if control.requests.load(ordering: .acquiring) != 0 {
                if control.stopRequested { return completed(.stop(.stopped)) }
                // Pause: complete any pending access (KVM_RUN with immediate_exit
                // returns EINTR after finishing it), then park.
                backend.setImmediateExit(true)
                do {
                    let e = try backend.run()
                    if e != .interrupted {
                        // A backend that returned a real exit instead: handle it, then try again.
                        if let out = dispatch(e, ctx, collectSites) {
                            if case .error = out { return out }
                            return completed(out)
                        }
                        continue
                    }
                } catch { return .error(.backend(error)) }
                control.park()
                backend.setImmediateExit(false)
                continue
            }
            let exit: VMExit
            do { exit = try backend.run() } catch { return .error(.backend(error)) }
            if case .interrupted = exit {
                ctx.statistics.record(.interrupted)
                backend.setImmediateExit(false)
                continue
            }
            if let out = dispatch(exit, ctx, collectSites) {
                if case .error = out { return out }
                return completed(out)
            }
        }
    }

    /// Before the vCPU leaves after a handled exit: let KVM finish the access
    /// (write an `in`/MMIO-load result into the register, advance RIP) with a
    /// `KVM_RUN` that has `immediate_exit` set, so the state read after the
    /// stop is final and a later run does not replay the old access.
    private func completed(_ outcome: Control.Outcome) -> Control.Outcome {
        guard let ctx = context else { return outcome }
        backend.setImmediateExit(true)
        // Completing can need more user-space work (the second half of a split
        // MMIO access, the next chunk of string I/O): KVM then returns another
        // exit even with immediate_exit set. Serve those, up to a bound.
        for _ in 0..<64 {
            guard let e = try? backend.run(), e != .interrupted else { break }
            if case .error = dispatch(e, ctx, ctx.statistics.collectSites) { break }
        }
        return outcome
    }

    /// Counts and dispatches one exit; returns an outcome when the vCPU must stop.
    @inline(__always)
    private func dispatch(_ exit: VMExit, _ ctx: ExitContext, _ collectSites: Bool) -> Control.Outcome? {
        if ctx.drainsCoalesced { ctx.vm.drainCoalesced(backend) }
        ctx.statistics.record(exit.kind)
        if collectSites, let rip = try? backend.registers().rip {
            ctx.statistics.record(site: ExitStatistics.site(for: exit, rip: rip))
        }
        do {
            switch try ctx.dispatch(exit) {
            case .handled: return nil
            case .pass:
                let rip = try? backend.registers().rip
                return .error(.unhandledExit(vcpu: id, exit: exit, rip: rip))
            case .stopVCPU: return .halted
            case .stopVM(let reason): return .stop(reason)
            }
        } catch {
            return .error(error)
        }
    }
}

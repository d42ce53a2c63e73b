/// What a locator needs from the exit being handled, beyond the public API:
/// the two RIPs of bracketing and the vCPU's events. `package`: for the DMP
/// module, not part of the public API.
extension ExitContext {
    /// RIP as reported at the current exit (read once, then remembered, so it
    /// stays known after a handler completed the access).
    package func instructionPointerAtExit() throws(VMError) -> UInt64 { try exitRIP() }

    /// RIP as reported at the current exit, `nil` when the backend cannot read
    /// it: ``instructionPointerAtExit()`` for the exit path of a handler that
    /// ignores the error (no ``VMError`` is built; one sync-regs load on KVM).
    package func instructionPointerAtExitIfAvailable() -> UInt64? {
        if let r = ripAtExit { return r }
        guard let r = try? backend.instructionPointer() else { return nil }
        ripAtExit = r
        return r
    }

    /// RIP after ``completePendingAccess()`` completed the current exit's
    /// access; `nil` when no completion ran for this exit (nothing was
    /// pending, or a stop cut it short).
    package var instructionPointerAfterCompletion: UInt64? { ripAfterCompletion }

    /// The vCPU's pending events (exception, interrupt shadow, NMI): an ioctl
    /// on KVM, keep it off the hot path. The corresponding ioctl is `KVM_GET_VCPU_EVENTS`.
    package func vcpuEvents() throws(VMError) -> VCPUEvents {
        do { return try backend.vcpuEvents() } catch { throw .backend(error) }
    }
}

extension VCPUEvents {
    /// The interrupt shadow (`interrupt.shadow` of `struct kvm_vcpu_events`):
    /// bit 0 after `mov ss`/`pop ss`, bit 1 after `sti`. While either is set the
    /// next instruction runs before any interrupt is taken. 0 when the bytes
    /// are too short to hold the field (read whatever `flags` says: KVM always
    /// marks it valid, and a nonzero value is the cautious reading).
    package var interruptShadow: UInt8 {
        guard bytes.count > 11 else { return 0 }
        return bytes[11] & 0x3
    }
}

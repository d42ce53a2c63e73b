/// The built-in last handler: HLT stops the vCPU, guest failures become typed errors with registers.
final class DefaultExitPolicy: ExitHandler {
    func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
        switch exit {
        case .halt: return .stopVCPU
        case .shutdown: throw fault(.tripleFault, context)
        case .internalError(let ie):
            throw fault(ie.isEmulationFailure ? .emulationFailure : .internalError(suberror: ie.suberror), context, data: ie.data)
        case .failEntry(let reason, _): throw fault(.failedEntry(reason: reason), context)
        case .systemEvent(let type, _): return .stopVM(.systemEvent(type: type))
        case .msrRead, .msrWrite:
            // No handler claimed the MSR: the guest gets #GP, as KVM gives for an MSR it does not know.
            context.rejectMSRAccess()
            return .handled
        default: return .pass
        }
    }

    private func fault(_ kind: GuestFault.Kind, _ context: ExitContext, data: [UInt64] = []) -> VMError {
        .guestFault(GuestFault(kind: kind, vcpu: context.vcpuID, registers: try? context.registers(),
                               specialRegisters: try? context.specialRegisters(), data: data))
    }
}

/// A guest failure the VM cannot continue from, with the vCPU state at that point.
public struct GuestFault: Hashable, Sendable, CustomStringConvertible {
    /// What went wrong.
    public enum Kind: Hashable, Sendable {
        /// The guest shut down (a triple fault).
        case tripleFault
        /// The hypervisor could not emulate an instruction.
        case emulationFailure
        /// Another `KVM_EXIT_INTERNAL_ERROR` sub-error.
        case internalError(suberror: UInt32)
        /// VM entry failed with this hardware reason.
        case failedEntry(reason: UInt64)
    }
    /// What went wrong.
    public var kind: Kind
    /// The vCPU.
    public var vcpu: Int
    /// The general registers, when they could be read.
    public var registers: Registers?
    /// The special registers, when they could be read.
    public var specialRegisters: SpecialRegisters?
    /// Extra data the hypervisor reported (internal errors).
    public var data: [UInt64]

    /// A multi-line description with the register dump.
    public var description: String {
        var s: String
        switch kind {
        case .tripleFault: s = "guest triple fault (shutdown) on vCPU \(vcpu)"
        case .emulationFailure: s = "instruction emulation failure on vCPU \(vcpu)"
        case .internalError(let e): s = "hypervisor internal error \(e) on vCPU \(vcpu)"
        case .failedEntry(let r): s = "VM entry failed (hardware reason 0x\(String(r, radix: 16))) on vCPU \(vcpu)"
        }
        if !data.isEmpty { s += "; data " + data.map { "0x" + String($0, radix: 16) }.joined(separator: " ") }
        if let r = registers { s += "\n" + r.description }
        if let sr = specialRegisters {
            s += "\ncr0=0x\(String(sr.cr0, radix: 16)) cr3=0x\(String(sr.cr3, radix: 16)) cr4=0x\(String(sr.cr4, radix: 16)) efer=0x\(String(sr.efer, radix: 16)) cs=0x\(String(sr.cs.selector, radix: 16)) cpl=\(sr.cpl)"
        }
        return s
    }
}

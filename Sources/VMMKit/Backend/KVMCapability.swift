import CKVM

/// KVM capability numbers and their argument flags, under their `kvm.h`
/// names, for ``VMBackend/checkExtension(_:)`` and
/// ``VMBackend/enableCapability(_:args:)`` (the values come from `kvm.h`
/// through the CKVM shim, not from literals).
public enum KVMCapability {
    /// `KVM_CAP_COALESCED_MMIO`: the coalesced ring's page offset in the vCPU mapping.
    public static let coalescedMMIO = UInt32(CKVM_CAP_COALESCED_MMIO)
    /// `KVM_CAP_SYNC_REGS`: which register sets travel through `kvm_run`.
    public static let syncRegs = UInt32(CKVM_CAP_SYNC_REGS)
    /// `KVM_CAP_X86_USER_SPACE_MSR`: MSR accesses exit to user space.
    public static let x86UserSpaceMSR = UInt32(CKVM_CAP_X86_USER_SPACE_MSR)
    /// `KVM_CAP_EXIT_ON_EMULATION_FAILURE`: an emulation failure exits with the instruction bytes.
    public static let exitOnEmulationFailure = UInt32(CKVM_CAP_EXIT_ON_EMULATION_FAILURE)
    /// `KVM_CAP_NR_MEMSLOTS`: how many memory slots a VM may have.
    public static let nrMemslots = UInt32(CKVM_CAP_NR_MEMSLOTS)
    /// `KVM_CAP_DISABLE_QUIRKS2`: checking gives the quirks that can be disabled; enabling disables those in `args[0]`.
    public static let disableQuirks2 = UInt32(CKVM_CAP_DISABLE_QUIRKS2)
    /// `KVM_X86_QUIRK_SLOT_ZAP_ALL`: a memslot delete zaps every shadow page (an argument of ``disableQuirks2``).
    public static let x86QuirkSlotZapAll = UInt64(CKVM_X86_QUIRK_SLOT_ZAP_ALL)
    /// `KVM_MSR_EXIT_REASON_UNKNOWN`: the ``x86UserSpaceMSR`` argument for MSRs KVM does not know.
    public static let msrExitReasonUnknown = UInt64(CKVM_MSR_EXIT_REASON_UNKNOWN)
}

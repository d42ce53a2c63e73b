/// One CPUID leaf as KVM reports and accepts it (`struct kvm_cpuid_entry2`).
public struct CPUIDEntry: Hashable, Sendable {
    /// The leaf (EAX input).
    public var function: UInt32
    /// The sub-leaf (ECX input), significant when bit 0 of ``flags`` is set.
    public var index: UInt32
    /// `KVM_CPUID_FLAG_*` bits (bit 0: the index is significant).
    public var flags: UInt32
    /// The output registers.
    public var eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32

    /// Creates an entry.
    public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0,
                eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) {
        self.function = function; self.index = index; self.flags = flags
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }
}

/// One model-specific register and its value.
public struct MSREntry: Hashable, Sendable {
    /// The MSR number.
    public var index: UInt32
    /// The MSR's value.
    public var value: UInt64
    /// Creates an entry.
    public init(index: UInt32, value: UInt64) { self.index = index; self.value = value }
}

/// The legacy FPU/SSE state (`struct kvm_fpu`), kept as its raw bytes.
public struct FPUState: Hashable, Sendable {
    /// The 416 bytes of `struct kvm_fpu`.
    public var bytes: [UInt8]
    /// Wraps raw bytes.
    public init(bytes: [UInt8]) { self.bytes = bytes }
}

/// The XSAVE area (`struct kvm_xsave`), kept as its raw bytes.
public struct XSAVEState: Hashable, Sendable {
    /// The 4096 bytes of `struct kvm_xsave`.
    public var bytes: [UInt8]
    /// Wraps raw bytes.
    public init(bytes: [UInt8]) { self.bytes = bytes }
}

/// The local APIC register page (`struct kvm_lapic_state`), kept as its raw bytes.
public struct LAPICState: Hashable, Sendable {
    /// The 1024 bytes of `struct kvm_lapic_state`.
    public var bytes: [UInt8]
    /// Wraps raw bytes.
    public init(bytes: [UInt8]) { self.bytes = bytes }
}

/// Pending exceptions, interrupts, NMIs and SMIs (`struct kvm_vcpu_events`), kept as raw bytes.
public struct VCPUEvents: Hashable, Sendable {
    /// The 64 bytes of `struct kvm_vcpu_events`.
    public var bytes: [UInt8]
    /// Wraps raw bytes.
    public init(bytes: [UInt8]) { self.bytes = bytes }
}

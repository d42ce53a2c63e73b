/// The general-purpose registers of an x86-64 vCPU (`struct kvm_regs`).
public struct Registers: Hashable, Sendable, CustomStringConvertible {
    /// The legacy general-purpose registers.
    public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
    /// Index, stack and frame registers.
    public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
    /// The 64-bit extension registers r8–r11.
    public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
    /// The 64-bit extension registers r12–r15.
    public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
    /// The instruction pointer.
    public var rip: UInt64 = 0
    /// The flags register (bit 1 is always set on x86).
    public var rflags: UInt64 = 2

    /// All registers zero, RFLAGS = 2.
    public init() {}

    /// A register dump, four registers per line.
    public var description: String {
        func h(_ v: UInt64) -> String {
            let s = String(v, radix: 16)
            return String(repeating: "0", count: max(0, 16 - s.count)) + s
        }
        return """
        rax=\(h(rax)) rbx=\(h(rbx)) rcx=\(h(rcx)) rdx=\(h(rdx))
        rsi=\(h(rsi)) rdi=\(h(rdi)) rsp=\(h(rsp)) rbp=\(h(rbp))
        r8 =\(h(r8)) r9 =\(h(r9)) r10=\(h(r10)) r11=\(h(r11))
        r12=\(h(r12)) r13=\(h(r13)) r14=\(h(r14)) r15=\(h(r15))
        rip=\(h(rip)) rflags=\(h(rflags))
        """
    }
}

/// A segment register's hidden state (`struct kvm_segment`).
public struct Segment: Hashable, Sendable {
    /// The segment base address.
    public var base: UInt64 = 0
    /// The segment limit in bytes (already scaled by the granularity).
    public var limit: UInt32 = 0
    /// The selector value.
    public var selector: UInt16 = 0
    /// The 4-bit type field of the descriptor.
    public var type: UInt8 = 0
    /// The P bit.
    public var present: Bool = false
    /// Descriptor privilege level (0–3).
    public var dpl: UInt8 = 0
    /// Default operand size (D/B bit).
    public var db: Bool = false
    /// S bit: code/data (true) or system (false).
    public var s: Bool = false
    /// L bit: 64-bit code segment.
    public var l: Bool = false
    /// Granularity (limit in 4 KiB units).
    public var g: Bool = false
    /// The AVL bit (available to software).
    public var avl: Bool = false
    /// Whether the segment is unusable.
    public var unusable: Bool = false

    /// A zeroed (null) segment.
    public init() {}

    /// A flat segment with the given attributes.
    public init(selector: UInt16, type: UInt8, base: UInt64 = 0, limit: UInt32 = 0xffff_ffff,
                dpl: UInt8 = 0, db: Bool = false, s: Bool = true, l: Bool = false, g: Bool = true) {
        self.base = base; self.limit = limit; self.selector = selector; self.type = type
        self.present = true; self.dpl = dpl; self.db = db; self.s = s; self.l = l; self.g = g
    }
}

/// A descriptor-table register (GDTR/IDTR).
public struct DescriptorTable: Hashable, Sendable {
    /// The table's linear base address.
    public var base: UInt64 = 0
    /// The table's limit (size in bytes minus one).
    public var limit: UInt16 = 0
    /// A zeroed table register.
    public init() {}
    /// A table register with the given base and limit.
    public init(base: UInt64, limit: UInt16) { self.base = base; self.limit = limit }
}

/// The special registers of an x86-64 vCPU (`struct kvm_sregs`).
public struct SpecialRegisters: Hashable, Sendable {
    /// The segment registers.
    public var cs = Segment(), ds = Segment(), es = Segment(), fs = Segment(), gs = Segment(), ss = Segment()
    /// The task register and the LDT register.
    public var tr = Segment(), ldt = Segment()
    /// The GDT and IDT registers.
    public var gdt = DescriptorTable(), idt = DescriptorTable()
    /// The control registers.
    public var cr0: UInt64 = 0x60000010, cr2: UInt64 = 0, cr3: UInt64 = 0, cr4: UInt64 = 0, cr8: UInt64 = 0
    /// The EFER MSR (LME, LMA, NXE, SCE).
    public var efer: UInt64 = 0
    /// The APIC base MSR.
    public var apicBase: UInt64 = 0xfee00900
    /// Pending external interrupts, one bit per vector (256 bits).
    public var interruptBitmap: [UInt64] = [0, 0, 0, 0]

    /// Reset-state special registers.
    public init() {}

    /// The current privilege level: the DPL of SS (equal to CS.RPL in protected mode).
    public var cpl: Int { cr0 & 1 == 0 ? 0 : Int(ss.dpl) }
    /// Whether the vCPU is in 64-bit mode (EFER.LMA and CS.L).
    public var isLongMode64: Bool { efer & 0x400 != 0 && cs.l }
}

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

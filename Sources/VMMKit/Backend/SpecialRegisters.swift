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

import VMMKit

/// The segment bases an address computation adds (from ``SpecialRegisters``).
public struct X86SegmentBases: Hashable, Sendable {
    /// The six segment bases.
    public var es: UInt64, cs: UInt64, ss: UInt64, ds: UInt64, fs: UInt64, gs: UInt64

    /// Creates bases (all zero by default, as in 64-bit mode without `fs`/`gs`).
    public init(es: UInt64 = 0, cs: UInt64 = 0, ss: UInt64 = 0, ds: UInt64 = 0, fs: UInt64 = 0, gs: UInt64 = 0) {
        self.es = es; self.cs = cs; self.ss = ss; self.ds = ds; self.fs = fs; self.gs = gs
    }

    /// The bases of a vCPU's segment registers.
    public init(_ sregs: SpecialRegisters) {
        self.init(es: sregs.es.base, cs: sregs.cs.base, ss: sregs.ss.base, ds: sregs.ds.base,
                  fs: sregs.fs.base, gs: sregs.gs.base)
    }

    /// The base of segment register `segment` in `mode`: in 64-bit mode only `fs` and `gs` have one.
    public func base(of segment: X86Register, mode: X86Mode) -> UInt64 {
        switch segment {
        case .fs: fs
        case .gs: gs
        case _ where mode == .bits64: 0
        case .es: es
        case .cs: cs
        case .ss: ss
        default: ds
        }
    }
}

extension X86Instruction {
    /// The segment a memory operand uses: its override, else `es` for a string
    /// instruction's destination, `ss` for `rsp`/`rbp`-based addresses, `ds` otherwise.
    public func segment(of m: X86MemoryOperand) -> X86Register {
        if let s = m.segment { return s }
        let base = m.base?.architectural
        if groups.contains(.string), base == .rdi { return .es }
        if base == .rsp || base == .rbp { return .ss }
        return .ds
    }

    /// The offset of memory operand `m` within its segment: base + index × scale +
    /// displacement, wrapped to the address size (`67` gives 32 bits in 64-bit mode).
    /// RIP-relative operands count from the next instruction. `nil` when the operand
    /// names a register ``Registers`` does not hold (a VSIB vector index).
    public func offset(of m: X86MemoryOperand, registers: Registers) -> UInt64? {
        var sum = UInt64(bitPattern: m.displacement)
        if let b = m.base {
            switch b {
            case .rip: sum &+= nextAddress
            case .eip: sum &+= nextAddress & 0xffff_ffff
            case .ip: sum &+= nextAddress & 0xffff
            default:
                guard let v = b.value(in: registers) else { return nil }
                sum &+= v
            }
        }
        if let i = m.index {
            guard let v = i.value(in: registers) else { return nil }
            sum &+= v &* UInt64(max(1, m.scale))
        }
        switch encoding.addressSize {
        case 16: return sum & 0xffff
        case 32: return sum & 0xffff_ffff
        default: return sum
        }
    }

    /// The linear (guest-virtual) address of memory operand `m`: its segment's base
    /// (only `fs`/`gs` in 64-bit mode) plus its ``offset(of:registers:)``, wrapped to
    /// 32 bits outside 64-bit mode.
    public func effectiveAddress(of m: X86MemoryOperand, registers: Registers, segments: X86SegmentBases = X86SegmentBases()) -> UInt64? {
        guard let off = offset(of: m, registers: registers) else { return nil }
        let linear = segments.base(of: segment(of: m), mode: mode) &+ off
        return mode == .bits64 ? linear : linear & 0xffff_ffff
    }

    /// The port an `in`/`out`/`ins`/`outs` accesses: its imm8, or DX from `registers`; `nil` for other instructions.
    public func ioPort(registers: Registers) -> UInt16? {
        guard encoding.map == .primary else { return nil }
        switch encoding.opcode {
        case 0xe4...0xe7:
            guard let f = encoding.immediate, f.offset < bytes.count else { return nil }
            return UInt16(bytes[f.offset])
        case 0xec...0xef, 0x6c...0x6f:
            return UInt16(truncatingIfNeeded: registers.rdx)
        default:
            return nil
        }
    }

    /// The width in bytes of one port access of an I/O instruction (1, 2 or 4); `nil` for other instructions.
    public var ioWidth: Int? {
        guard groups.contains(.portIO) else { return nil }
        if encoding.opcode & 1 == 0 { return 1 }
        return encoding.operandSize == 16 ? 2 : 4
    }

    /// Whether an I/O instruction reads from the port (`in`, `ins`) or writes to it (`out`, `outs`); `nil` for other instructions.
    public var ioDirection: AccessDirection? {
        guard groups.contains(.portIO) else { return nil }
        return [0xe4, 0xe5, 0xec, 0xed, 0x6c, 0x6d].contains(encoding.opcode) ? .read : .write
    }
}

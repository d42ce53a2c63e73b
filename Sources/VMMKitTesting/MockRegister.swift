import VMMKit

/// A general register a scripted access loads into.
public enum MockRegister: String, Hashable, Sendable, CaseIterable {
    /// RAX (and the target of `in`).
    case rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15

    /// The register's value in `r`.
    public func value(in r: Registers) -> UInt64 {
        switch self {
        case .rax: r.rax
        case .rbx: r.rbx
        case .rcx: r.rcx
        case .rdx: r.rdx
        case .rsi: r.rsi
        case .rdi: r.rdi
        case .rsp: r.rsp
        case .rbp: r.rbp
        case .r8: r.r8
        case .r9: r.r9
        case .r10: r.r10
        case .r11: r.r11
        case .r12: r.r12
        case .r13: r.r13
        case .r14: r.r14
        case .r15: r.r15
        }
    }

    /// Stores `value` into the register in `r`.
    public func set(_ value: UInt64, in r: inout Registers) {
        switch self {
        case .rax: r.rax = value
        case .rbx: r.rbx = value
        case .rcx: r.rcx = value
        case .rdx: r.rdx = value
        case .rsi: r.rsi = value
        case .rdi: r.rdi = value
        case .rsp: r.rsp = value
        case .rbp: r.rbp = value
        case .r8: r.r8 = value
        case .r9: r.r9 = value
        case .r10: r.r10 = value
        case .r11: r.r11 = value
        case .r12: r.r12 = value
        case .r13: r.r13 = value
        case .r14: r.r14 = value
        case .r15: r.r15 = value
        }
    }

    /// Writes a load of `size` bytes into the register in `r` as x86-64 does:
    /// 1 and 2 bytes merge into the low bytes, 4 bytes zero-extend, 8 replace.
    public func load(_ value: UInt64, size: Int, in r: inout Registers) {
        let old = self.value(in: r)
        switch size {
        case 1: set(old & ~0xff | value & 0xff, in: &r)
        case 2: set(old & ~0xffff | value & 0xffff, in: &r)
        case 4: set(value & 0xffff_ffff, in: &r)
        default: set(value, in: &r)
        }
    }
}

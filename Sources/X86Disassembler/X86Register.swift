import CCapstone
import VMMKit

/// An x86 register, typed (Capstone's register ids mapped once, no strings).
///
/// General-purpose registers come in every width (`rax`, `eax`, `ax`, `al`, `ah`);
/// ``architectural`` maps each to its 64-bit register and ``value(in:)`` reads it
/// from a vCPU's ``Registers``.
public enum X86Register: Hashable, Sendable, CustomStringConvertible {
    /// 64-bit general-purpose registers.
    case rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15
    /// 32-bit general-purpose registers.
    case eax, ecx, edx, ebx, esp, ebp, esi, edi, r8d, r9d, r10d, r11d, r12d, r13d, r14d, r15d
    /// 16-bit general-purpose registers.
    case ax, cx, dx, bx, sp, bp, si, di, r8w, r9w, r10w, r11w, r12w, r13w, r14w, r15w
    /// Low-byte registers (`spl`..`dil` and `r8b`.. need REX).
    case al, cl, dl, bl, spl, bpl, sil, dil, r8b, r9b, r10b, r11b, r12b, r13b, r14b, r15b
    /// High-byte registers (bits 15:8 of rax, rcx, rdx, rbx; not encodable with REX).
    case ah, ch, dh, bh
    /// The instruction pointer in its three widths.
    case rip, eip, ip
    /// The flags register.
    case eflags
    /// Segment registers.
    case es, cs, ss, ds, fs, gs
    /// The pseudo index registers that mean "no index" in a SIB byte (`eiz`, `riz`).
    case eiz, riz
    /// The x87 status word.
    case fpsw
    /// A control register (0–15).
    case cr(UInt8)
    /// A debug register (0–15).
    case dr(UInt8)
    /// An x87 stack register (0–7).
    case st(UInt8)
    /// An x87 physical register, as Capstone names them in implicit lists (0–7).
    case fp(UInt8)
    /// An MMX register (0–7).
    case mm(UInt8)
    /// An AVX-512 mask register (0–7).
    case k(UInt8)
    /// An XMM register (0–31).
    case xmm(UInt8)
    /// A YMM register (0–31).
    case ymm(UInt8)
    /// A ZMM register (0–31).
    case zmm(UInt8)

    /// The 64-bit general-purpose registers in encoding order (0 = rax ... 15 = r15).
    public static let gpr64: [X86Register] = [.rax, .rcx, .rdx, .rbx, .rsp, .rbp, .rsi, .rdi, .r8, .r9, .r10, .r11, .r12, .r13, .r14, .r15]
    /// The 32-bit general-purpose registers in encoding order.
    public static let gpr32: [X86Register] = [.eax, .ecx, .edx, .ebx, .esp, .ebp, .esi, .edi, .r8d, .r9d, .r10d, .r11d, .r12d, .r13d, .r14d, .r15d]
    /// The 16-bit general-purpose registers in encoding order.
    public static let gpr16: [X86Register] = [.ax, .cx, .dx, .bx, .sp, .bp, .si, .di, .r8w, .r9w, .r10w, .r11w, .r12w, .r13w, .r14w, .r15w]
    /// The low-byte registers in encoding order (with REX: spl, bpl, sil, dil at 4–7).
    public static let gpr8: [X86Register] = [.al, .cl, .dl, .bl, .spl, .bpl, .sil, .dil, .r8b, .r9b, .r10b, .r11b, .r12b, .r13b, .r14b, .r15b]

    /// For a general-purpose register: its encoding number (0–15), width in bytes and whether it is a high byte.
    public var generalPurpose: (number: Int, width: Int, highByte: Bool)? {
        switch self {
        case .rax: (0, 8, false)
        case .rcx: (1, 8, false)
        case .rdx: (2, 8, false)
        case .rbx: (3, 8, false)
        case .rsp: (4, 8, false)
        case .rbp: (5, 8, false)
        case .rsi: (6, 8, false)
        case .rdi: (7, 8, false)
        case .r8: (8, 8, false)
        case .r9: (9, 8, false)
        case .r10: (10, 8, false)
        case .r11: (11, 8, false)
        case .r12: (12, 8, false)
        case .r13: (13, 8, false)
        case .r14: (14, 8, false)
        case .r15: (15, 8, false)
        case .eax: (0, 4, false)
        case .ecx: (1, 4, false)
        case .edx: (2, 4, false)
        case .ebx: (3, 4, false)
        case .esp: (4, 4, false)
        case .ebp: (5, 4, false)
        case .esi: (6, 4, false)
        case .edi: (7, 4, false)
        case .r8d: (8, 4, false)
        case .r9d: (9, 4, false)
        case .r10d: (10, 4, false)
        case .r11d: (11, 4, false)
        case .r12d: (12, 4, false)
        case .r13d: (13, 4, false)
        case .r14d: (14, 4, false)
        case .r15d: (15, 4, false)
        case .ax: (0, 2, false)
        case .cx: (1, 2, false)
        case .dx: (2, 2, false)
        case .bx: (3, 2, false)
        case .sp: (4, 2, false)
        case .bp: (5, 2, false)
        case .si: (6, 2, false)
        case .di: (7, 2, false)
        case .r8w: (8, 2, false)
        case .r9w: (9, 2, false)
        case .r10w: (10, 2, false)
        case .r11w: (11, 2, false)
        case .r12w: (12, 2, false)
        case .r13w: (13, 2, false)
        case .r14w: (14, 2, false)
        case .r15w: (15, 2, false)
        case .al: (0, 1, false)
        case .cl: (1, 1, false)
        case .dl: (2, 1, false)
        case .bl: (3, 1, false)
        case .spl: (4, 1, false)
        case .bpl: (5, 1, false)
        case .sil: (6, 1, false)
        case .dil: (7, 1, false)
        case .r8b: (8, 1, false)
        case .r9b: (9, 1, false)
        case .r10b: (10, 1, false)
        case .r11b: (11, 1, false)
        case .r12b: (12, 1, false)
        case .r13b: (13, 1, false)
        case .r14b: (14, 1, false)
        case .r15b: (15, 1, false)
        case .ah: (0, 1, true)
        case .ch: (1, 1, true)
        case .dh: (2, 1, true)
        case .bh: (3, 1, true)
        default: nil
        }
    }

    /// The register's width in bytes (segment registers 2; x87 registers 10; `eflags` 4).
    public var width: Int {
        if let g = generalPurpose { return g.width }
        switch self {
        case .rip, .riz: return 8
        case .eip, .eiz, .eflags: return 4
        case .ip, .fpsw, .es, .cs, .ss, .ds, .fs, .gs: return 2
        case .cr, .dr, .mm: return 8
        case .k: return 8
        case .st, .fp: return 10
        case .xmm: return 16
        case .ymm: return 32
        case .zmm: return 64
        default: return 8
        }
    }

    /// The 64-bit architectural register this one is part of: `al`, `ah`, `ax`, `eax` → `rax`;
    /// `r8d` → `r8`; `eip`/`ip` → `rip`; `xmm3`/`ymm3` → `zmm3`; others map to themselves.
    public var architectural: X86Register {
        if let g = generalPurpose { return X86Register.gpr64[g.number] }
        switch self {
        case .eip, .ip: return .rip
        case .eiz: return .riz
        case .xmm(let n), .ymm(let n): return .zmm(n)
        default: return self
        }
    }

    /// The register's value read from `registers` (general-purpose registers in any width,
    /// the instruction pointer, the flags, and 0 for `eiz`/`riz`); `nil` for registers
    /// ``Registers`` does not hold.
    public func value(in registers: Registers) -> UInt64? {
        let full: UInt64
        switch architectural {
        case .rax: full = registers.rax
        case .rcx: full = registers.rcx
        case .rdx: full = registers.rdx
        case .rbx: full = registers.rbx
        case .rsp: full = registers.rsp
        case .rbp: full = registers.rbp
        case .rsi: full = registers.rsi
        case .rdi: full = registers.rdi
        case .r8: full = registers.r8
        case .r9: full = registers.r9
        case .r10: full = registers.r10
        case .r11: full = registers.r11
        case .r12: full = registers.r12
        case .r13: full = registers.r13
        case .r14: full = registers.r14
        case .r15: full = registers.r15
        case .rip: full = registers.rip
        case .eflags: return registers.rflags & 0xffff_ffff
        case .riz: return 0
        default: return nil
        }
        switch generalPurpose?.width ?? width {
        case 1: return generalPurpose?.highByte == true ? (full >> 8) & 0xff : full & 0xff
        case 2: return full & 0xffff
        case 4: return full & 0xffff_ffff
        default: return full
        }
    }

    /// The register's name as the Intel syntax writes it (`eax`, `r8d`, `xmm3`).
    public var description: String {
        switch self {
        case .cr(let n): "cr\(n)"
        case .dr(let n): "dr\(n)"
        case .mm(let n): "mm\(n)"
        case .k(let n): "k\(n)"
        case .xmm(let n): "xmm\(n)"
        case .ymm(let n): "ymm\(n)"
        case .zmm(let n): "zmm\(n)"
        case .st(let n): "st(\(n))"
        case .fp(let n): "fp\(n)"
        case .rax: "rax"
        case .rcx: "rcx"
        case .rdx: "rdx"
        case .rbx: "rbx"
        case .rsp: "rsp"
        case .rbp: "rbp"
        case .rsi: "rsi"
        case .rdi: "rdi"
        case .r8: "r8"
        case .r9: "r9"
        case .r10: "r10"
        case .r11: "r11"
        case .r12: "r12"
        case .r13: "r13"
        case .r14: "r14"
        case .r15: "r15"
        case .eax: "eax"
        case .ecx: "ecx"
        case .edx: "edx"
        case .ebx: "ebx"
        case .esp: "esp"
        case .ebp: "ebp"
        case .esi: "esi"
        case .edi: "edi"
        case .r8d: "r8d"
        case .r9d: "r9d"
        case .r10d: "r10d"
        case .r11d: "r11d"
        case .r12d: "r12d"
        case .r13d: "r13d"
        case .r14d: "r14d"
        case .r15d: "r15d"
        case .ax: "ax"
        case .cx: "cx"
        case .dx: "dx"
        case .bx: "bx"
        case .sp: "sp"
        case .bp: "bp"
        case .si: "si"
        case .di: "di"
        case .r8w: "r8w"
        case .r9w: "r9w"
        case .r10w: "r10w"
        case .r11w: "r11w"
        case .r12w: "r12w"
        case .r13w: "r13w"
        case .r14w: "r14w"
        case .r15w: "r15w"
        case .al: "al"
        case .cl: "cl"
        case .dl: "dl"
        case .bl: "bl"
        case .spl: "spl"
        case .bpl: "bpl"
        case .sil: "sil"
        case .dil: "dil"
        case .r8b: "r8b"
        case .r9b: "r9b"
        case .r10b: "r10b"
        case .r11b: "r11b"
        case .r12b: "r12b"
        case .r13b: "r13b"
        case .r14b: "r14b"
        case .r15b: "r15b"
        case .ah: "ah"
        case .ch: "ch"
        case .dh: "dh"
        case .bh: "bh"
        case .rip: "rip"
        case .eip: "eip"
        case .ip: "ip"
        case .eflags: "eflags"
        case .es: "es"
        case .cs: "cs"
        case .ss: "ss"
        case .ds: "ds"
        case .fs: "fs"
        case .gs: "gs"
        case .eiz: "eiz"
        case .riz: "riz"
        case .fpsw: "fpsw"
        }
    }

    /// Capstone's register id mapped to a register (`nil` for `X86_REG_INVALID` and unknown ids).
    init?(capstone id: UInt32) {
        guard id < UInt32(X86Register.capstoneTable.count), let r = X86Register.capstoneTable[Int(id)] else { return nil }
        self = r
    }

    /// Indexed by Capstone 4's `x86_reg` raw value.
    private static let capstoneTable: [X86Register?] = {
        var t = [X86Register?](repeating: nil, count: Int(X86_REG_ENDING.rawValue))
        func set(_ id: x86_reg, _ r: X86Register) { t[Int(id.rawValue)] = r }
        set(X86_REG_RAX, .rax)
        set(X86_REG_RCX, .rcx)
        set(X86_REG_RDX, .rdx)
        set(X86_REG_RBX, .rbx)
        set(X86_REG_RSP, .rsp)
        set(X86_REG_RBP, .rbp)
        set(X86_REG_RSI, .rsi)
        set(X86_REG_RDI, .rdi)
        set(X86_REG_R8, .r8)
        set(X86_REG_R9, .r9)
        set(X86_REG_R10, .r10)
        set(X86_REG_R11, .r11)
        set(X86_REG_R12, .r12)
        set(X86_REG_R13, .r13)
        set(X86_REG_R14, .r14)
        set(X86_REG_R15, .r15)
        set(X86_REG_EAX, .eax)
        set(X86_REG_ECX, .ecx)
        set(X86_REG_EDX, .edx)
        set(X86_REG_EBX, .ebx)
        set(X86_REG_ESP, .esp)
        set(X86_REG_EBP, .ebp)
        set(X86_REG_ESI, .esi)
        set(X86_REG_EDI, .edi)
        set(X86_REG_R8D, .r8d)
        set(X86_REG_R9D, .r9d)
        set(X86_REG_R10D, .r10d)
        set(X86_REG_R11D, .r11d)
        set(X86_REG_R12D, .r12d)
        set(X86_REG_R13D, .r13d)
        set(X86_REG_R14D, .r14d)
        set(X86_REG_R15D, .r15d)
        set(X86_REG_AX, .ax)
        set(X86_REG_CX, .cx)
        set(X86_REG_DX, .dx)
        set(X86_REG_BX, .bx)
        set(X86_REG_SP, .sp)
        set(X86_REG_BP, .bp)
        set(X86_REG_SI, .si)
        set(X86_REG_DI, .di)
        set(X86_REG_R8W, .r8w)
        set(X86_REG_R9W, .r9w)
        set(X86_REG_R10W, .r10w)
        set(X86_REG_R11W, .r11w)
        set(X86_REG_R12W, .r12w)
        set(X86_REG_R13W, .r13w)
        set(X86_REG_R14W, .r14w)
        set(X86_REG_R15W, .r15w)
        set(X86_REG_AL, .al)
        set(X86_REG_CL, .cl)
        set(X86_REG_DL, .dl)
        set(X86_REG_BL, .bl)
        set(X86_REG_SPL, .spl)
        set(X86_REG_BPL, .bpl)
        set(X86_REG_SIL, .sil)
        set(X86_REG_DIL, .dil)
        set(X86_REG_R8B, .r8b)
        set(X86_REG_R9B, .r9b)
        set(X86_REG_R10B, .r10b)
        set(X86_REG_R11B, .r11b)
        set(X86_REG_R12B, .r12b)
        set(X86_REG_R13B, .r13b)
        set(X86_REG_R14B, .r14b)
        set(X86_REG_R15B, .r15b)
        set(X86_REG_AH, .ah)
        set(X86_REG_CH, .ch)
        set(X86_REG_DH, .dh)
        set(X86_REG_BH, .bh)
        set(X86_REG_RIP, .rip)
        set(X86_REG_EIP, .eip)
        set(X86_REG_IP, .ip)
        set(X86_REG_EFLAGS, .eflags)
        set(X86_REG_ES, .es)
        set(X86_REG_CS, .cs)
        set(X86_REG_SS, .ss)
        set(X86_REG_DS, .ds)
        set(X86_REG_FS, .fs)
        set(X86_REG_GS, .gs)
        set(X86_REG_EIZ, .eiz)
        set(X86_REG_RIZ, .riz)
        set(X86_REG_FPSW, .fpsw)
        for n in 0..<16 { t[Int(X86_REG_CR0.rawValue) + n] = .cr(UInt8(n)) }
        for n in 0..<16 { t[Int(X86_REG_DR0.rawValue) + n] = .dr(UInt8(n)) }
        for n in 0..<8 { t[Int(X86_REG_FP0.rawValue) + n] = .fp(UInt8(n)) }
        for n in 0..<8 { t[Int(X86_REG_K0.rawValue) + n] = .k(UInt8(n)) }
        for n in 0..<8 { t[Int(X86_REG_MM0.rawValue) + n] = .mm(UInt8(n)) }
        for n in 0..<8 { t[Int(X86_REG_ST0.rawValue) + n] = .st(UInt8(n)) }
        for n in 0..<32 { t[Int(X86_REG_XMM0.rawValue) + n] = .xmm(UInt8(n)) }
        for n in 0..<32 { t[Int(X86_REG_YMM0.rawValue) + n] = .ymm(UInt8(n)) }
        for n in 0..<32 { t[Int(X86_REG_ZMM0.rawValue) + n] = .zmm(UInt8(n)) }
        return t
    }()
}

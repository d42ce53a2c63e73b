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

import VMMKit

/// A vCPU's view of guest memory for decoding: its mode, segment bases and page
/// tables, so code is read the way the vCPU fetches it (through the page walk,
/// page by page: an instruction may straddle two pages mapped anywhere).
public struct X86CodeContext: Sendable {
    /// Guest memory.
    public let memory: GuestMemory
    /// The vCPU's special registers (mode, segments, paging).
    public let specialRegisters: SpecialRegisters
    /// The paging state taken from ``specialRegisters``.
    public let paging: PagingContext
    /// The mode CS.L / CS.D / CR0.PE say.
    public let mode: X86Mode
    /// The segment bases.
    public let segments: X86SegmentBases

    /// A context for a vCPU with these special registers. Throws ``X86DecodeError/compatibilityMode``
    /// for long mode with a 16- or 32-bit code segment.
    public init(memory: GuestMemory, specialRegisters: SpecialRegisters) throws(X86DecodeError) {
        self.memory = memory
        self.specialRegisters = specialRegisters
        self.paging = PagingContext(specialRegisters)
        self.mode = try X86CodeContext.mode(of: specialRegisters)
        self.segments = X86SegmentBases(specialRegisters)
    }

    /// The decoding mode of a vCPU: 64-bit with EFER.LMA and CS.L; 16-bit with CR0.PE clear;
    /// otherwise CS.D picks 32 or 16. Long mode with CS.L clear (compatibility mode) is refused.
    public static func mode(of sregs: SpecialRegisters) throws(X86DecodeError) -> X86Mode {
        let lma = sregs.efer & (1 << 10) != 0
        if lma {
            guard sregs.cs.l else { throw .compatibilityMode }
            return .bits64
        }
        if sregs.cr0 & 1 == 0 { return .bits16 }
        return sregs.cs.db ? .bits32 : .bits16
    }

    /// The linear address of instruction pointer `rip` (CS base added outside 64-bit mode).
    public func linear(instructionPointer rip: UInt64) -> UInt64 {
        mode == .bits64 ? rip : (segments.cs &+ rip) & 0xffff_ffff
    }

    /// The page-walk access an instruction fetch needs (execute, and user at CPL3).
    public var fetchAccess: PageAccess { specialRegisters.cpl == 3 ? [.execute, .user] : [.execute] }

    /// Translates a linear address for `access` (identity when paging is off).
    public func translate(_ linear: UInt64, access: PageAccess) throws(GuestMemoryError) -> GuestAddress {
        try memory.translate(linear, paging: paging, access: access).physical
    }

    /// Reads up to `count` bytes of code starting at `rip`, page by page. Stops early where a
    /// page's walk or read fails, and says where and why.
    public func readCode(at rip: UInt64, count: Int) -> (bytes: [UInt8], stop: (virtual: UInt64, error: GuestMemoryError)?) {
        var out: [UInt8] = []
        let start = linear(instructionPointer: rip)
        let wrap: UInt64 = mode == .bits64 ? ~0 : 0xffff_ffff
        // At most count pages: bounded whatever the addresses.
        while out.count < count {
            let va = (start &+ UInt64(out.count)) & wrap
            let chunk = min(count - out.count, Int(4096 - (va & 0xfff)))
            do throws(GuestMemoryError) {
                let pa = try translate(va, access: fetchAccess)
                out += try memory.readBytes(at: pa, count: chunk)
            } catch {
                return (out, (va, error))
            }
        }
        return (out, nil)
    }

    /// The readable bytes of code right before `rip` (at most `count`): fewer when the page
    /// before is not mapped or `rip` is near address 0.
    public func readCode(before rip: UInt64, count: Int) -> [UInt8] {
        var out: [UInt8] = []
        var end = rip
        while out.count < count, end > 0 {
            let inPage = end & 0xfff == 0 ? 4096 : Int(end & 0xfff)
            let chunk = min(count - out.count, inPage, Int(min(end, UInt64(Int.max))))
            let (bytes, stop) = readCode(at: end - UInt64(chunk), count: chunk)
            guard stop == nil else { break }
            out = bytes + out
            end -= UInt64(chunk)
        }
        return out
    }
}

extension X86Disassembler {
    /// Decodes the instruction at `rip` as the vCPU would fetch it: in the context's mode, through
    /// the page walk. Code running into an unmapped page gives ``X86DecodeError/codeEndsAt(virtual:available:_:)``
    /// (an instruction that ends before that page decodes normally).
    public func decode(at rip: UInt64, in context: X86CodeContext) throws(X86DecodeError) -> X86Instruction {
        let (bytes, stop) = context.readCode(at: rip, count: 15)
        if bytes.isEmpty, let s = stop { throw .fetch(virtual: s.virtual, s.error) }
        do throws(X86DecodeError) {
            return try decode(bytes, address: rip, mode: context.mode)
        } catch {
            if case .truncated = error, let s = stop { throw .codeEndsAt(virtual: s.virtual, available: bytes.count, s.error) }
            throw error
        }
    }

    /// The instruction that ends exactly at `end`, confirmed by decoding forward from `start`, a
    /// known instruction boundary such as the enclosing function's first byte. `nil` when the
    /// forward decode steps over `end`, fails before reaching it, or needs more than `limit`
    /// instructions. This settles what the bytes before RIP leave open (`41 EE` and `EE` both
    /// end at the same address and both are `out dx, al`).
    public func instruction(endingAt end: UInt64, decodingFrom start: UInt64, in context: X86CodeContext,
                            limit: Int = 4096) -> X86Instruction? {
        var address = start
        for _ in 0..<max(0, limit) {
            guard address < end, let i = try? decode(at: address, in: context) else { return nil }
            let next = i.nextAddress
            if next == end { return i }
            guard next > address, next < end else { return nil }
            address = next
        }
        return nil
    }

    /// The instructions that end exactly at `rip`, read through the page walk (see
    /// ``candidatesEnding(at:bytesBefore:mode:)``).
    public func candidatesEnding(at rip: UInt64, in context: X86CodeContext) -> [X86Instruction] {
        candidatesEnding(at: rip, bytesBefore: context.readCode(before: rip, count: 15), mode: context.mode)
    }
}

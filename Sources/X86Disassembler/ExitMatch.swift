import VMMKit

/// The device access a VM exit reported, which the exiting instruction must reproduce.
public struct X86ExitAccess: Hashable, Sendable, CustomStringConvertible {
    /// Where the access went.
    public enum Target: Hashable, Sendable {
        /// An I/O port.
        case port(UInt16)
        /// A guest-physical address (MMIO).
        case memory(GuestAddress)
    }

    /// The port or guest-physical address.
    public var target: Target
    /// The access width in bytes.
    public var width: Int
    /// Read or write, seen from the guest.
    public var direction: AccessDirection

    /// Creates an access.
    public init(_ target: Target, width: Int, direction: AccessDirection) {
        self.target = target; self.width = width; self.direction = direction
    }

    /// The access of a port I/O exit.
    public init(_ io: PortIO) { self.init(.port(io.port), width: Int(io.size), direction: io.direction) }

    /// The access of an MMIO exit.
    public init(_ mmio: MMIOAccess) { self.init(.memory(mmio.address), width: Int(mmio.size), direction: mmio.direction) }

    /// e.g. `port 0x3f8 write1`, `mmio 0xd0000000 read4`.
    public var description: String {
        let d = direction == .write ? "write" : "read"
        switch target {
        case .port(let p): return "port 0x\(String(p, radix: 16)) \(d)\(width)"
        case .memory(let a): return "mmio 0x\(String(a.rawValue, radix: 16)) \(d)\(width)"
        }
    }
}

extension X86Instruction {
    /// Whether executing this instruction with `registers` makes the device access `access`:
    /// for port I/O, an `in`/`out`/`ins`/`outs` with that port (imm8 or DX), width and
    /// direction; for MMIO, a memory operand accessed in that direction whose effective
    /// address translates (through `context`'s page walk) to the exit's guest-physical
    /// address with that width. Without a context, MMIO matches with linear = physical
    /// and segment bases zero.
    ///
    /// Accepted partial accesses, as KVM reports them: an operand wider than 8 bytes or
    /// one crossing a page exits in pieces (a piece at the operand's start, at a page
    /// boundary or at a multiple of 8 bytes matches). A string instruction (`movs`, `stos`,
    /// `lods`, `cmps`, `scas`) may exit with its address registers already advanced by one
    /// element, so the neighbouring elements match too. Registers are those at the exit:
    /// an instruction that overwrote its own address registers does not match.
    public func reproduces(_ access: X86ExitAccess, registers: Registers, context: X86CodeContext? = nil) -> Bool {
        switch access.target {
        case .port(let port):
            return ioPort(registers: registers) == port && ioWidth == access.width && ioDirection == access.direction
        case .memory(let gpa):
            guard !groups.contains(.portIO), groups.contains(.memoryAccess), access.width > 0 else { return false }
            let need: OperandAccess = access.direction == .write ? .write : .read
            let segments = context?.segments ?? X86SegmentBases()
            for op in operands where op.access.contains(need) && op.size > 0 {
                guard let m = op.memory, let ea = effectiveAddress(of: m, registers: registers, segments: segments) else { continue }
                let strides: [Int64] = groups.contains(.string) ? [0, -Int64(op.size), Int64(op.size)] : [0]
                for s in strides where matchesPiece(ea &+ UInt64(bitPattern: s), size: op.size, access: access, gpa: gpa, context: context) {
                    return true
                }
            }
            return false
        }
    }

    /// Whether some piece of the operand `[ea, ea + size)` translates to `gpa` with the access's width.
    private func matchesPiece(_ ea: UInt64, size: Int, access: X86ExitAccess, gpa: GuestAddress, context: X86CodeContext?) -> Bool {
        let pageOffset = Int(ea & 0xfff)
        let crosses = pageOffset + size > 4096
        var offsets = [0]
        if crosses { offsets.append(4096 - pageOffset) }
        if size > 8 { offsets += stride(from: 8, to: size, by: 8) }
        for o in offsets where o + access.width <= size {
            // A whole access must match exactly; pieces only when the operand is split.
            guard (o == 0 && access.width == size) || crosses || size > 8 else { continue }
            let linear = ea &+ UInt64(o)
            let physical: GuestAddress?
            if let c = context {
                var pageAccess: PageAccess = access.direction == .write ? [.write] : []
                if c.specialRegisters.cpl == 3 { pageAccess.insert(.user) }
                physical = try? c.translate(linear, access: pageAccess)
            } else {
                physical = GuestAddress(linear)
            }
            if physical == gpa { return true }
        }
        return false
    }
}

extension X86Disassembler {
    /// The instructions that could have made `access`: those ending exactly at `rip` (RIP
    /// already past the instruction) and the one starting at `rip` (RIP still on it), each kept
    /// only if it ``X86Instruction/reproduces(_:registers:context:)`` the access. DMP's locator
    /// takes a single survivor, after confirming one that ends at RIP with
    /// ``instruction(endingAt:decodingFrom:in:limit:)`` (the bytes before RIP can end in several
    /// valid decodings, such as `out dx, al` with and without a REX prefix); none or several means
    /// "not patchable".
    public func candidates(reproducing access: X86ExitAccess, rip: UInt64, registers: Registers,
                           context: X86CodeContext) -> (endingAt: [X86Instruction], startingAt: X86Instruction?) {
        let before = candidatesEnding(at: rip, in: context).filter { $0.reproduces(access, registers: registers, context: context) }
        let at = (try? decode(at: rip, in: context)).flatMap { $0.reproduces(access, registers: registers, context: context) ? $0 : nil }
        return (before, at)
    }
}

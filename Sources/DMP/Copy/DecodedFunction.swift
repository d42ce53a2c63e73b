import VMMKit
import X86Disassembler

/// Code addresses a guest records in a table of its own (a kernel's exception and
/// bug tables, jump labels, alternatives, ftrace and patchable entries, static
/// calls, return thunks). A function named in such a table is not copied, and
/// padding it names is not dead: a copy would freeze or break what the table does
/// with those addresses (DESIGN.md, DMP step 4).
package struct CodeAddressTable: Hashable, Sendable {
    /// The table's name, for the refusal (`__ex_table`, `__jump_table`).
    package var name: String
    /// The guest-virtual code addresses it records.
    package var addresses: [UInt64]
    /// Whether the table records *pads* the guest rewrites in place, and nothing else (gcc's `__mcount_loc` for
    /// `-pg -mrecord-mcount`, the `call __fentry__` or 5-byte NOP at each function's start that ftrace turns into a
    /// call and back; `__patchable_function_entries` for `-fpatchable-function-entry`, the NOPs at or before each
    /// function's start). A function holding a pad may be copied: the guest's write to the pad hits a guarded
    /// page and invalidates the copy, as any code write does. But no patch writes over a pad (the guest checks
    /// the bytes it expects there before rewriting them), and padding holding one is not dead.
    package var recordsPads: Bool

    /// Creates a table.
    package init(name: String, addresses: [UInt64], recordsPads: Bool = false) {
        self.name = name; self.addresses = addresses; self.recordsPads = recordsPads
    }

    /// The tables of pads an ELF image may hold, by section name (each an array of 8-byte code addresses).
    package static let padSections = ["__mcount_loc", "__patchable_function_entries"]
    /// The most addresses read from one table.
    package static let maximumAddresses = 1 << 16
}

/// A function bounded by a sized symbol, decoded whole: its instructions end
/// exactly at the symbol's end and no relative branch lands inside an instruction.
package struct DecodedFunction: Sendable {
    /// The function's symbol (sized).
    package let symbol: GuestSymbol
    /// Its bytes (exactly `symbol.size` of them).
    package let bytes: [UInt8]
    /// Its instructions in address order, covering `[start, end)` without gaps.
    package let instructions: [X86Instruction]

    /// The first byte.
    package var start: UInt64 { symbol.address }
    /// One past the last byte.
    package var end: UInt64 { symbol.address &+ symbol.size }

    /// Whether `address` lies inside the function.
    package func contains(_ address: UInt64) -> Bool { address >= start && address < end }

    /// The index of the instruction that starts at `address`, or `nil` when no instruction starts there.
    package func index(at address: UInt64) -> Int? {
        var lo = 0, hi = instructions.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if instructions[mid].address < address { lo = mid + 1 } else { hi = mid }
        }
        return lo < instructions.count && instructions[lo].address == address ? lo : nil
    }

    /// `name+0xoff` for an address inside the function.
    package func location(_ address: UInt64) -> String {
        address == start ? symbol.name : "\(symbol.name)+0x\(String(address &- start, radix: 16))"
    }

    /// Loop heads: targets inside the function of relative branches that go backwards (or to themselves).
    package var loopHeads: Set<UInt64> {
        var heads: Set<UInt64> = []
        for i in instructions {
            if let b = i.branch, contains(b.target), b.target <= i.address, !i.groups.contains(.call) { heads.insert(b.target) }
        }
        return heads
    }

    /// Decodes `symbol`'s function from `bytes` (its first `symbol.size` bytes are the function) and checks
    /// only that it decodes whole: no invalid bytes, decoding ends exactly at the symbol's end, every relative
    /// branch into the function lands on an instruction start. Used for the function to copy and for the
    /// functions holding call sites (whose boundaries must be confirmed before a site is trusted).
    package static func decode(_ symbol: GuestSymbol, bytes: [UInt8], disassembler: X86Disassembler) throws(DMPRefusal) -> DecodedFunction {
        guard symbol.size > 0 else { throw DMPRefusal(.plan, "\(symbol.name) has no symbol size") }
        guard symbol.isFunction else { throw DMPRefusal(.plan, "\(symbol.name) is not a function symbol") }
        guard symbol.size <= maximumSize else {
            throw DMPRefusal(.plan, "\(symbol.name) is \(symbol.size) bytes, more than the \(maximumSize) a copy takes")
        }
        let size = Int(symbol.size)
        guard bytes.count >= size else {
            throw DMPRefusal(.plan, "\(symbol.name): \(bytes.count) of its \(size) bytes available")
        }
        var out: [X86Instruction] = []
        var offset = 0
        while offset < size {
            let address = symbol.address &+ UInt64(offset)
            let where_ = offset == 0 ? symbol.name : "\(symbol.name)+0x\(String(offset, radix: 16))"
            do throws(X86DecodeError) {
                let i = try disassembler.decode(Array(bytes[offset..<min(offset + 15, size)]), address: address, mode: .bits64)
                out.append(i)
                offset += i.length
            } catch {
                switch error {
                case .truncated:
                    throw DMPRefusal(.plan, "decoding \(symbol.name) does not end at its symbol's end: the instruction at \(where_) runs past it")
                case .vendorDependentBranch:
                    throw DMPRefusal(.plan, "66-prefixed branch at \(where_) (its length depends on the CPU vendor)")
                default:
                    throw DMPRefusal(.plan, "invalid bytes at \(where_) (\(error))")
                }
            }
        }
        let f = DecodedFunction(symbol: symbol, bytes: Array(bytes.prefix(size)), instructions: out)
        for i in out {
            if let b = i.branch, f.contains(b.target), f.index(at: b.target) == nil {
                throw DMPRefusal(.plan, "branch at \(f.location(i.address)) lands inside an instruction (\(f.location(b.target)))")
            }
        }
        return f
    }

    /// The largest function a copy takes (bounded work per plan).
    package static let maximumSize: UInt64 = 64 << 10

    /// Checks every rule of DESIGN.md step 4 that makes a decoded function uncopyable and throws the first
    /// refusal: `xbegin`; `66`- or `bnd`-prefixed branches and returns; `ud0`/`ud1`/`ud2`; `int n`, `int3`,
    /// `into`, `int1`, `syscall`, `sysenter`; a `call` to the next instruction; a RIP-relative operand, an
    /// absolute memory address or a 32/64-bit immediate that points inside the function (data in text, code
    /// addresses taken); a function named in a code-address table.
    package func checkCopyable(tables: [CodeAddressTable] = []) throws(DMPRefusal) {
        for t in tables where !t.recordsPads {
            if let a = t.addresses.first(where: contains) {
                throw DMPRefusal(.plan, "\(symbol.name) is named in \(t.name) at \(location(a)) (a copy would freeze or break that table)")
            }
        }
        for i in instructions {
            if let reason = uncopyable(i) { throw DMPRefusal(.plan, "\(reason) at \(location(i.address))") }
        }
    }

    /// Why one instruction cannot be copied, or `nil`.
    private func uncopyable(_ i: X86Instruction) -> String? {
        let e = i.encoding, g = i.groups
        if g.contains(.transactional) && g.contains(.jump) { return "xbegin (its abort address would stay in the copy)" }
        let branch = g.contains(.jump) || g.contains(.call) || g.contains(.return)
        if branch && e.hasOperandSizePrefix { return "66-prefixed branch (\(i))" }
        if branch && e.hasRepne { return "bnd-prefixed branch (\(i))" }
        if g.contains(.undefined) { return "\(i.mnemonic) (bug tables and traps record its address)" }
        if g.contains(.interrupt) { return "\(i) (a trap or system call records its address)" }
        if g.contains(.call), let b = i.branch, b.target == i.nextAddress {
            return "call to the next instruction (it reads its own address)"
        }
        if e.isRIPRelative, let d = e.displacement, let disp = d.signedValue(in: i.bytes) {
            let target = i.nextAddress &+ UInt64(bitPattern: disp)
            if contains(target) { return "RIP-relative operand pointing inside the function (data in text: \(location(target)))" }
        }
        for op in i.operands {
            if let m = op.memory, m.base == nil, !m.isRIPRelative, contains(UInt64(bitPattern: m.displacement)) {
                return "absolute address inside the function (\(location(UInt64(bitPattern: m.displacement))))"
            }
        }
        if !e.isRelativeBranch, let f = e.immediate, f.size >= 4, let v = f.signedValue(in: i.bytes) {
            let zeroExtended = f.size == 4 ? UInt64(UInt32(truncatingIfNeeded: v)) : UInt64(bitPattern: v)
            if contains(zeroExtended) || contains(UInt64(bitPattern: v)) {
                return "immediate holding an address inside the function (\(location(zeroExtended)))"
            }
        }
        return nil
    }
}

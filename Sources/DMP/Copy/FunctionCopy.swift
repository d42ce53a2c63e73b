import VMMKit
import X86Disassembler

/// A hot instruction of the function to copy and the body that replaces it in the copy.
///
/// `emit` returns the body's bytes for the guest-virtual address it will run at
/// (bodies address their data RIP-relatively). The body falls through at its end to
/// the copy of the next instruction; when its fast path does not apply it executes
/// the original instruction itself (which exits from inside the copy).
package struct HotRewrite: Sendable {
    /// The hot instruction's guest-virtual address in the original function.
    package var address: UInt64
    /// The body's bytes at a given guest-virtual address (at least one byte, at most 4 KiB).
    package var emit: @Sendable (_ at: UInt64) throws(DMPRefusal) -> [UInt8]

    /// Creates a rewrite.
    package init(address: UInt64, emit: @escaping @Sendable (_ at: UInt64) throws(DMPRefusal) -> [UInt8]) {
        self.address = address; self.emit = emit
    }
}

/// A function copied into the implant (DESIGN.md, DMP step 4, the function copy):
/// every instruction relocated (relative branches refitted, `jcc rel8` relaxed to
/// rel32, `jrcxz`/`loop` expanded, RIP-relative displacements refitted; branches
/// inside the function go to the copy's corresponding point, branches outside to
/// the original targets), hot instructions replaced by their bodies, a 5-byte NOP
/// after every call and at every loop head so an invalidated copy can be evicted
/// with one-instruction writes (``evictionWrites``). Indirect jumps stay as they
/// are (`notrack` kept): they land in the intact original.
///
/// The planner is pure: it reads nothing from the guest and writes nothing.
package struct FunctionCopy: Sendable {
    /// What a stretch of the copy holds.
    package enum PieceKind: String, Hashable, Sendable {
        /// An instruction copied byte for byte.
        case copied
        /// An instruction re-encoded for its new address (relative branch, RIP-relative operand).
        case relocated
        /// A hot instruction's body.
        case rewritten
        /// A 5-byte NOP after a call or at a loop head (an eviction point).
        case pad
        /// The `jmp rel32` to the original's end when the last instruction can fall through.
        case exit
    }

    /// One stretch of the copy and the original address it stands for.
    package struct Piece: Hashable, Sendable {
        /// What it holds.
        package var kind: PieceKind
        /// The original instruction it copies; for a pad, the original address its eviction jump goes to;
        /// for the exit, the function's end.
        package var original: UInt64
        /// Where it lies in the copy (guest-virtual).
        package var copy: Range<UInt64>
    }

    /// The function copied.
    package let function: DecodedFunction
    /// The copy's guest-virtual address.
    package let address: UInt64
    /// The copy's bytes, to be written at ``address``.
    package let bytes: [UInt8]
    /// The copy's stretches in address order.
    package let pieces: [Piece]
    /// Original instruction address → its corresponding point in the copy (the pad before it, if any).
    private let map: [UInt64: UInt64]

    /// One past the copy's last byte.
    package var end: UInt64 { address &+ UInt64(bytes.count) }

    /// The copy's point corresponding to the original instruction at `original` (a pad in front of it
    /// included), or `nil` when no instruction of the function starts there.
    package func copyAddress(of original: UInt64) -> UInt64? { map[original] }

    /// The original address a copy address stands for: the instruction a copied, relocated or rewritten
    /// byte belongs to, the instruction a pad leads to, the function's end for the exit jump; `nil` outside the copy.
    package func originalAddress(of copyAddress: UInt64) -> UInt64? {
        var lo = 0, hi = pieces.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if pieces[mid].copy.upperBound <= copyAddress { lo = mid + 1 } else { hi = mid }
        }
        return lo < pieces.count && pieces[lo].copy.contains(copyAddress) ? pieces[lo].original : nil
    }

    /// Every original instruction start and its point in the copy, by original address.
    package var offsetMap: [(original: UInt64, copy: UInt64)] {
        function.instructions.compactMap { i in map[i.address].map { (i.address, $0) } }
    }

    /// The writes that evict an invalidated copy: each pad becomes a `jmp rel32` to the original's
    /// corresponding point, so a thread returning into the copy or going round one of its loops leaves it.
    package var evictionWrites: [PatchWrite] {
        pieces.compactMap { p -> PatchWrite? in
            guard p.kind == .pad, let jmp = CopyEncoding.branch32(0xe9, at: p.copy.lowerBound, to: p.original) else { return nil }
            return PatchWrite(address: p.copy.lowerBound, original: CopyEncoding.nop5, replacement: jmp)
        }
    }

    /// The original addresses of the function's indirect jumps (jump tables, computed gotos, indirect
    /// tail calls): in the copy they land in the original, correct and slower on that path.
    package var indirectJumps: [UInt64] {
        function.instructions.filter { $0.groups.contains(.indirectBranch) && $0.groups.contains(.jump) }.map(\.address)
    }

    /// Copies `function` to the guest-virtual `address` with `rewrites` applied, or refuses
    /// (``DecodedFunction/checkCopyable(tables:)``; a hot address that is not an instruction start or is a
    /// branch; a body that is empty or too large; a target beyond ±2 GiB of the copy).
    package init(_ function: DecodedFunction, at address: UInt64, rewrites: [HotRewrite] = [],
                 tables: [CodeAddressTable] = []) throws(DMPRefusal) {
        try function.checkCopyable(tables: tables)
        var hot: [UInt64: HotRewrite] = [:]
        for r in rewrites {
            guard let k = function.index(at: r.address) else {
                throw DMPRefusal(.plan, "hot address 0x\(String(r.address, radix: 16)) is not an instruction start of \(function.symbol.name)")
            }
            let g = function.instructions[k].groups
            guard !g.contains(.jump), !g.contains(.call), !g.contains(.return) else {
                throw DMPRefusal(.plan, "hot instruction at \(function.location(r.address)) is a branch")
            }
            guard hot.updateValue(r, forKey: r.address) == nil else {
                throw DMPRefusal(.plan, "two rewrites for \(function.location(r.address))")
            }
        }
        self.function = function
        self.address = address

        // Pass 1: the layout. Every size is fixed except the bodies, which are emitted at their final
        // addresses because everything before them is already laid out.
        let heads = function.loopHeads
        var layout: [(piece: Piece, instruction: Int?, body: [UInt8]?)] = []
        var map: [UInt64: UInt64] = [:]
        var offset: UInt64 = 0
        func add(_ kind: PieceKind, _ original: UInt64, _ length: Int, _ instruction: Int?, _ body: [UInt8]? = nil) {
            let start = address &+ offset
            layout.append((Piece(kind: kind, original: original, copy: start..<start &+ UInt64(length)), instruction, body))
            offset &+= UInt64(length)
        }
        let instructions = function.instructions
        for (k, i) in instructions.enumerated() {
            map[i.address] = address &+ offset
            if heads.contains(i.address) || (k > 0 && instructions[k - 1].groups.contains(.call)) {
                add(.pad, i.address, 5, nil)
            }
            if let r = hot[i.address] {
                let body = try r.emit(address &+ offset)
                guard (1...4096).contains(body.count) else {
                    throw DMPRefusal(.plan, "the body for \(function.location(i.address)) is \(body.count) bytes (1 to 4096 fit)")
                }
                add(.rewritten, i.address, body.count, k, body)
            } else if i.branch != nil {
                add(.relocated, i.address, try FunctionCopy.relocatedLength(i, in: function), k)
            } else {
                add(i.encoding.isRIPRelative ? .relocated : .copied, i.address, i.length, k)
            }
        }
        if let last = instructions.last {
            if last.groups.contains(.call) { add(.pad, function.end, 5, nil) }
            let g = last.groups
            let fallsThrough = hot[last.address] != nil || !(g.contains(.return) || (g.contains(.jump) && !g.contains(.conditionalBranch)))
            if fallsThrough { add(.exit, function.end, 5, nil) }
        }

        // Pass 2: the bytes.
        var bytes: [UInt8] = []
        bytes.reserveCapacity(Int(offset))
        for (piece, k, body) in layout {
            let at = piece.copy.lowerBound
            switch piece.kind {
            case .pad:
                guard CopyEncoding.rel32(from: at, length: 5, to: piece.original) != nil else {
                    throw DMPRefusal(.plan, "the copy at 0x\(String(at, radix: 16)) is beyond ±2 GiB of \(function.symbol.name)")
                }
                bytes += CopyEncoding.nop5
            case .exit:
                guard let jmp = CopyEncoding.branch32(0xe9, at: at, to: piece.original) else {
                    throw DMPRefusal(.plan, "the copy at 0x\(String(at, radix: 16)) is beyond ±2 GiB of \(function.symbol.name)")
                }
                bytes += jmp
            case .rewritten:
                bytes += body ?? []
            case .copied:
                if let k { bytes += instructions[k].bytes }
            case .relocated:
                guard let k else { continue }
                bytes += try FunctionCopy.relocate(instructions[k], to: at, in: function, map: map)
            }
        }
        self.bytes = bytes
        self.pieces = layout.map(\.piece)
        self.map = map
    }

    /// The length of a relative branch once relocated: `jmp`/`call rel32` 5, `jcc rel32` 6,
    /// `loop`/`loope`/`loopne`/`jrcxz` expanded to 9 (10 with an address-size prefix).
    static func relocatedLength(_ i: X86Instruction, in function: DecodedFunction) throws(DMPRefusal) -> Int {
        let e = i.encoding
        switch (e.map, e.opcode) {
        case (.primary, 0xe8), (.primary, 0xe9), (.primary, 0xeb): return 5
        case (.primary, 0x70...0x7f), (.map0F, 0x80...0x8f): return 6
        case (.primary, 0xe0...0xe3): return e.hasAddressSizePrefix ? 10 : 9
        default: throw DMPRefusal(.plan, "relative branch \(i) at \(function.location(i.address)) has no relocation")
        }
    }

    /// `i` re-encoded at `at`: relative branches refitted (targets inside the function mapped through `map`),
    /// RIP-relative displacements refitted to the same data.
    static func relocate(_ i: X86Instruction, to at: UInt64, in function: DecodedFunction,
                         map: [UInt64: UInt64]) throws(DMPRefusal) -> [UInt8] {
        let e = i.encoding
        func beyond(_ target: UInt64) -> DMPRefusal {
            DMPRefusal(.plan, "target 0x\(String(target, radix: 16)) of \(function.location(i.address)) is beyond ±2 GiB of the copy at 0x\(String(at, radix: 16))")
        }
        if let b = i.branch {
            let target = function.contains(b.target) ? (map[b.target] ?? b.target) : b.target
            let length = try relocatedLength(i, in: function)
            guard let rel = CopyEncoding.rel32(from: at, length: length, to: target) else { throw beyond(target) }
            switch (e.map, e.opcode) {
            case (.primary, 0xe8): return [0xe8] + CopyEncoding.le32(rel)
            case (.primary, 0xe9), (.primary, 0xeb): return [0xe9] + CopyEncoding.le32(rel)
            case (.primary, 0x70...0x7f), (.map0F, 0x80...0x8f): return [0x0f, 0x80 | (e.opcode & 0x0f)] + CopyEncoding.le32(rel)
            default:
                // loop/loope/loopne/jrcxz rel8 → `op +2; jmp +5; jmp rel32 target` (no flags touched).
                let prefix: [UInt8] = e.hasAddressSizePrefix ? [0x67] : []
                return prefix + [e.opcode, 0x02, 0xeb, 0x05, 0xe9] + CopyEncoding.le32(rel)
            }
        }
        guard e.isRIPRelative, let field = e.displacement, field.size == 4, let disp = field.signedValue(in: i.bytes) else {
            return i.bytes
        }
        let target = i.nextAddress &+ UInt64(bitPattern: disp)
        guard let rel = CopyEncoding.rel32(from: at, length: i.length, to: target) else { throw beyond(target) }
        var out = i.bytes
        out.replaceSubrange(field.range, with: CopyEncoding.le32(rel))
        return out
    }
}

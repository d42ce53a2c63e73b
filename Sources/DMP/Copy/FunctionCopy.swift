import VMMKit
import X86Disassembler

/// A hot instruction of the function to copy and the body that replaces it in the copy.
///
/// `emit` emits the body into the copy's assembler at its final place (typically
/// ``FastPathEmitter/emitBody(for:routes:into:)``). The body falls through at its end
/// to the copy of the next instruction; when its fast path does not apply it executes
/// the original instruction itself (which exits from inside the copy).
package struct HotRewrite: Sendable {
    /// The hot instruction's guest-virtual address in the original function.
    package var address: UInt64
    /// Emits the body (at least one byte, at most 4 KiB) at the assembler's position.
    package var emit: @Sendable (_ assembler: inout X86Assembler) throws(DMPRefusal) -> Void

    /// Creates a rewrite.
    package init(address: UInt64, emit: @escaping @Sendable (_ assembler: inout X86Assembler) throws(DMPRefusal) -> Void) {
        self.address = address; self.emit = emit
    }

    /// A rewrite whose body is fixed bytes (tests, and bodies that need no address).
    package init(address: UInt64, bytes: [UInt8]) {
        self.init(address: address) { a in a.raw(bytes) }
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
    package var evictionWrites: [PatchWrite] { evictionWrites(to: nil) }

    /// The writes that evict this copy in favour of `next` (a rebuilt copy of the same function): each pad
    /// becomes a `jmp rel32` to `next`'s point for the same original instruction (same frame, same registers;
    /// both copies hold their pads at the same instructions), or to the original where `next` has none.
    package func evictionWrites(to next: FunctionCopy?) -> [PatchWrite] {
        pieces.compactMap { p -> PatchWrite? in
            let target = next?.copyAddress(of: p.original) ?? p.original
            guard p.kind == .pad, let jmp = CopyEncoding.branch32(at: p.copy.lowerBound, to: target) else { return nil }
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

        // One pass through the assembler: a label at every instruction's point (the pad in front of it,
        // if any), bodies emitted at their final addresses, branches inside the function to labels.
        let instructions = function.instructions
        let heads = function.loopHeads
        var a = X86Assembler(origin: address)
        var labels: [UInt64: X86Assembler.Label] = [:]
        for i in instructions { labels[i.address] = a.newLabel() }
        var pieces: [Piece] = []
        func piece(_ kind: PieceKind, _ original: UInt64, from start: UInt64) {
            pieces.append(Piece(kind: kind, original: original, copy: start..<a.position))
        }
        func pad(_ original: UInt64) throws(DMPRefusal) {
            guard X86Assembler.rel32(to: original, from: a.position &+ 5) != nil else {
                throw DMPRefusal(.plan, "the copy at 0x\(String(a.position, radix: 16)) is beyond ±2 GiB of \(function.symbol.name)")
            }
            let start = a.position
            a.raw(CopyEncoding.nop5)
            piece(.pad, original, from: start)
        }
        for (k, i) in instructions.enumerated() {
            if let l = labels[i.address] { try a.bind(l) }
            if heads.contains(i.address) || (k > 0 && instructions[k - 1].groups.contains(.call)) { try pad(i.address) }
            let start = a.position
            if let r = hot[i.address] {
                try r.emit(&a)
                let size = a.position &- start
                guard (1...4096).contains(size) else {
                    throw DMPRefusal(.plan, "the body for \(function.location(i.address)) is \(size) bytes (1 to 4096 fit)")
                }
                piece(.rewritten, i.address, from: start)
            } else if let b = i.branch {
                try a.relocate(i, branchTarget: function.contains(b.target) ? labels[b.target].map { .label($0) } : nil)
                piece(.relocated, i.address, from: start)
            } else {
                try a.relocate(i)
                piece(i.encoding.isRIPRelative ? .relocated : .copied, i.address, from: start)
            }
        }
        if let last = instructions.last {
            if last.groups.contains(.call) { try pad(function.end) }
            let g = last.groups
            if hot[last.address] != nil || !(g.contains(.return) || (g.contains(.jump) && !g.contains(.conditionalBranch))) {
                let start = a.position
                try a.jmp(.absolute(function.end))
                piece(.exit, function.end, from: start)
            }
        }
        self.bytes = try a.finish()
        self.pieces = pieces
        var map: [UInt64: UInt64] = [:]
        for i in instructions { if let l = labels[i.address], let at = a.address(of: l) { map[i.address] = at } }
        self.map = map
    }
}

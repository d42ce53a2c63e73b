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
/// are (`notrack` kept): they land in the intact original, except the dispatches
/// of recognized jump tables (``JumpTable``), which stay in the copy.
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
    /// The jump tables whose dispatches stay in the copy (their snapshots and translated tables follow the code).
    package let jumpTables: [JumpTable]
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

    /// The original instruction whose body (a rewritten hot instruction) holds `copyAddress` past its first byte,
    /// or `nil`. A body's own exits (its original access, a ring kick) lie past its checks, never at its first
    /// byte: an exit there with RIP past its instruction came from the copied instruction before the body.
    package func bodyOriginal(holding copyAddress: UInt64) -> UInt64? {
        var lo = 0, hi = pieces.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if pieces[mid].copy.upperBound <= copyAddress { lo = mid + 1 } else { hi = mid }
        }
        guard lo < pieces.count, pieces[lo].kind == .rewritten, pieces[lo].copy.contains(copyAddress),
              copyAddress != pieces[lo].copy.lowerBound else { return nil }
        return pieces[lo].original
    }

    /// The original call instruction a return address inside the copy returns from: the call before the pad a
    /// return lands on (pads follow every call), or the promoted call whose body holds it (its miss path's call
    /// returns into it); `nil` otherwise.
    package func originalCall(returningTo copyAddress: UInt64) -> UInt64? {
        guard let p = pieces.first(where: { $0.copy.contains(copyAddress) }) else { return nil }
        switch p.kind {
        case .pad:
            guard p.copy.lowerBound == copyAddress, let f = function(containing: p.original &- 1) ?? (p.original == function.end ? function : nil),
                  let call = f.instructions.first(where: { $0.nextAddress == p.original }), call.groups.contains(.call) else { return nil }
            return call.address
        case .rewritten:
            // A guarded tail jump's body returns nowhere.
            guard promotions.contains(where: { $0.site == p.original }), let f = function(containing: p.original),
                  let k = f.index(at: p.original), f.instructions[k].groups.contains(.call) else { return nil }
            return p.original
        default:
            return nil
        }
    }

    /// The instruction of the copy that ends exactly at the copy address `end`, when it is one of the copied
    /// functions' instructions copied or relocated (not a body, pad or exit jump): where it starts in the copy, the original
    /// instruction it stands for, and the original's predecessor (nil for the function's first instruction).
    /// Its bytes decode as the original's, relocated: what a forward decode from the function's start proves for
    /// the original, the copy's layout proves here.
    package func instruction(endingAt end: UInt64) -> (copyStart: UInt64, original: X86Instruction, previous: X86Instruction?)? {
        guard let p = pieces.first(where: { $0.copy.upperBound == end && ($0.kind == .copied || $0.kind == .relocated) }),
              let f = function(containing: p.original), let k = f.index(at: p.original) else { return nil }
        return (p.copy.lowerBound, f.instructions[k], k > 0 ? f.instructions[k - 1] : nil)
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
        let guarded = Set(promotions.map(\.site))
        return function.instructions.filter { $0.groups.contains(.indirectBranch) && $0.groups.contains(.jump) && !guarded.contains($0.address) }
            .map(\.address)
    }

    /// A function a copy calls through a promoted call (``CallPromotion``), copied after the main function with
    /// its own hot instructions rewritten.
    package struct Accessor: Sendable {
        /// The accessor, decoded whole.
        package var function: DecodedFunction
        /// Its hot instructions' bodies.
        package var rewrites: [HotRewrite]

        /// Creates an accessor to copy.
        package init(function: DecodedFunction, rewrites: [HotRewrite]) { self.function = function; self.rewrites = rewrites }
    }

    /// The calls of ``function`` (and of its accessors) promoted to calls of ``accessors``' copies.
    package let promotions: [CallPromotion]
    /// The accessors copied after the function (each a function of its own; their pieces follow the function's).
    package let accessors: [DecodedFunction]

    /// The function and the accessors it calls: the copied functions, the main one first.
    package var functions: [DecodedFunction] { [function] + accessors }

    /// The copied function (the main one or an accessor) holding the original address `address`.
    package func function(containing address: UInt64) -> DecodedFunction? { functions.first { $0.contains(address) } }

    /// The guest's bytes the copy was made from (each copied function's, each promoted call's thunk): their pages
    /// are guarded, and they must be unchanged when the patch is written.
    package var sources: [CodeImage.Region] {
        functions.map { CodeImage.Region(address: $0.start, bytes: $0.bytes) } + promotions.flatMap(\.thunks)
    }

    /// Copies `function` to the guest-virtual `address` with `rewrites` applied, or refuses
    /// (``DecodedFunction/checkCopyable(tables:)``; a hot address that is not an instruction start or is a
    /// branch; a body that is empty or too large; a target beyond ±2 GiB of the copy).
    ///
    /// `promotions`: calls of `function` replaced by ``CallPromotion/emit(_:call:entries:into:)``, each calling
    /// copies of its accessors, which `accessors` holds (copied after `function`, in order, with their rewrites).
    ///
    /// `jumpTables`: `function`'s jump tables (``JumpTable/find(in:image:)``) whose dispatches stay in the copy;
    /// ignored where the copy's address is beyond a 32-bit displacement.
    package init(_ function: DecodedFunction, at address: UInt64, rewrites: [HotRewrite] = [],
                 tables: [CodeAddressTable] = [], promotions: [CallPromotion] = [], accessors: [Accessor] = [],
                 jumpTables: [JumpTable] = []) throws(DMPRefusal) {
        let parts = [Accessor(function: function, rewrites: rewrites)] + accessors
        var promoted: [UInt64: CallPromotion] = [:]
        for p in promotions {
            // A call of the function, or of an accessor copied after it (an accessor that calls another through a
            // pointer itself: the caller of a function copy whose entries lie on a rarely taken path, promoted).
            // Or an indirect tail jump (``CallPromotion/tailJumps(in:to:image:disassembler:)``), guarded the same way.
            guard let holder = parts.first(where: { $0.function.index(at: p.site) != nil })?.function,
                  let k = holder.index(at: p.site),
                  holder.instructions[k].groups.contains(.call) || CallPromotion.isIndirectJump(holder.instructions[k])
                    || (CallPromotion.isDirectJump32(holder.instructions[k]) && p.thunk != nil) else {
                throw DMPRefusal(.plan, "promoted call at 0x\(String(p.site, radix: 16)) is no call or indirect jump of \(function.symbol.name) or its accessors")
            }
            guard promoted.updateValue(p, forKey: p.site) == nil else {
                throw DMPRefusal(.plan, "two promotions of the call at \(holder.location(p.site))")
            }
            for a in p.accessors where !accessors.contains(where: { $0.function.start == a }) {
                throw DMPRefusal(.plan, "the promoted call at \(holder.location(p.site)) names 0x\(String(a, radix: 16)), no accessor copied")
            }
        }
        for (k, part) in parts.enumerated() {
            try part.function.checkCopyable(tables: tables)
            if let other = parts[..<k].first(where: { $0.function.end > part.function.start && part.function.end > $0.function.start }) {
                throw DMPRefusal(.plan, "\(part.function.symbol.name) overlaps \(other.function.symbol.name), copied too")
            }
        }
        var hot: [UInt64: HotRewrite] = [:]
        for part in parts {
            for r in part.rewrites {
                let f = part.function
                guard let k = f.index(at: r.address) else {
                    throw DMPRefusal(.plan, "hot address 0x\(String(r.address, radix: 16)) is not an instruction start of \(f.symbol.name)")
                }
                let g = f.instructions[k].groups
                guard !g.contains(.jump), !g.contains(.call), !g.contains(.return) else {
                    throw DMPRefusal(.plan, "hot instruction at \(f.location(r.address)) is a branch")
                }
                guard hot.updateValue(r, forKey: r.address) == nil else {
                    throw DMPRefusal(.plan, "two rewrites for \(f.location(r.address))")
                }
            }
        }
        self.function = function
        self.address = address
        self.promotions = promotions
        self.accessors = accessors.map(\.function)
        // An absolute table's dispatch in the copy names its tables by 32-bit displacements; a relative one's does not.
        let near = JumpTable.fitsDisplacement(address) && JumpTable.fitsDisplacement(address &+ 0x10_0000)
        let jumpTables = jumpTables.filter { function.index(at: $0.jump) != nil && (near || $0.form == .relative) }
        self.jumpTables = jumpTables
        var dispatches: [UInt64: (table: JumpTable, fixups: JumpTable.Fixups)] = [:]
        for t in jumpTables { dispatches[t.jump] = (t, JumpTable.Fixups()) }

        // One pass through the assembler: a label at every instruction's point (the pad in front of it,
        // if any), bodies emitted at their final addresses, branches inside a function to labels; the
        // accessors after the function, their entries labelled for the promoted calls.
        var a = X86Assembler(origin: address)
        var labels: [UInt64: X86Assembler.Label] = [:]
        for part in parts { for i in part.function.instructions { labels[i.address] = a.newLabel() } }
        var pieces: [Piece] = []
        func piece(_ kind: PieceKind, _ original: UInt64, from start: UInt64) {
            pieces.append(Piece(kind: kind, original: original, copy: start..<a.position))
        }
        func pad(_ original: UInt64, of function: DecodedFunction) throws(DMPRefusal) {
            guard X86Assembler.rel32(to: original, from: a.position &+ 5) != nil else {
                throw DMPRefusal(.plan, "the copy at 0x\(String(a.position, radix: 16)) is beyond ±2 GiB of \(function.symbol.name)")
            }
            let start = a.position
            a.raw(CopyEncoding.nop5)
            piece(.pad, original, from: start)
        }
        for part in parts {
            let function = part.function
            let instructions = function.instructions
            // A kept dispatch's targets get pads too (an evicted copy is left there).
            let heads = function.loopHeads.union(jumpTables.flatMap { $0.targets(in: function) })
            for (k, i) in instructions.enumerated() {
                if let l = labels[i.address] { try a.bind(l) }
                if heads.contains(i.address) || (k > 0 && instructions[k - 1].groups.contains(.call)) { try pad(i.address, of: function) }
                let start = a.position
                if let r = hot[i.address] {
                    try r.emit(&a)
                    let size = a.position &- start
                    guard (1...4096).contains(size) else {
                        throw DMPRefusal(.plan, "the body for \(function.location(i.address)) is \(size) bytes (1 to 4096 fit)")
                    }
                    piece(.rewritten, i.address, from: start)
                } else if let p = promoted[i.address] {
                    let entries = p.accessors.compactMap { labels[$0].map { X86Assembler.Target.label($0) } }
                    try CallPromotion.emit(p, call: i, entries: entries, into: &a)
                    piece(.rewritten, i.address, from: start)
                } else if let d = dispatches[i.address] {
                    try d.table.emitDispatch(replacing: i, in: function, into: &a, fixups: &dispatches[i.address, default: d].fixups) { t in
                        labels[t].map { .label($0) }
                    }
                    piece(.relocated, i.address, from: start)
                } else if let b = i.branch {
                    // Inside the function, or a direct tail jump to a function copied here too (an accessor's start).
                    let here = function.contains(b.target)
                        || (!i.groups.contains(.call) && parts.contains { $0.function.start == b.target })
                    try a.relocate(i, branchTarget: here ? labels[b.target].map { .label($0) } : nil)
                    piece(.relocated, i.address, from: start)
                } else {
                    try a.relocate(i)
                    piece(i.encoding.isRIPRelative ? .relocated : .copied, i.address, from: start)
                }
            }
            if let last = instructions.last {
                if last.groups.contains(.call) { try pad(function.end, of: function) }
                let g = last.groups
                if hot[last.address] != nil || !(g.contains(.return) || (g.contains(.jump) && !g.contains(.conditionalBranch))) {
                    let start = a.position
                    try a.jmp(.absolute(function.end))
                    piece(.exit, function.end, from: start)
                }
            }
        }
        var map: [UInt64: UInt64] = [:]
        for part in parts {
            for i in part.function.instructions { if let l = labels[i.address], let at = a.address(of: l) { map[i.address] = at } }
        }
        var placed: [(fixups: JumpTable.Fixups, snapshot: UInt64, translated: UInt64)] = []
        for t in jumpTables where t.form == .absolute {
            let (snapshot, translated) = try t.emitTables(into: &a) { map[$0] }
            placed.append((dispatches[t.jump]?.fixups ?? JumpTable.Fixups(), snapshot, translated))
        }
        var bytes = try a.finish()
        for p in placed { JumpTable.fill(&bytes, fixups: p.fixups, snapshot: p.snapshot, translated: p.translated) }
        self.bytes = bytes
        self.pieces = pieces
        self.map = map
    }
}

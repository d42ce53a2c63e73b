import VMMKit
import X86Disassembler

/// A jump table a copied function dispatches through (a `switch`), with the entries the guest's image held when
/// the copy was planned. Two forms, gcc's:
/// - ``Form/absolute``: `jmp qword ptr [index*8 + table]` (non-PIC code), entries are code addresses;
/// - ``Form/relative``: `lea base, [rip + table]`, `movsxd target, dword ptr [base + index*4]`, `add target, base`,
///   `jmp target` (PIC and PIE code), entries are 32-bit offsets from the table.
/// Either may carry `notrack` (`3E`, `-fcf-protection`), which the copy keeps on its own indirect jump.
///
/// In the copy the dispatch stays in the copy. For an absolute table ``FunctionCopy`` emits, in place of the `jmp`,
/// a check that the index is below the snapshot's length and that the guest's entry still equals the snapshot's,
/// then an indirect jump through a translated table (entries inside the function go to the copy's corresponding
/// points, others stay as they are). For a relative table it emits a compare of the jump's runtime target with each
/// in-function target the snapshot names, each equal one continuing at the copy's point for it: the target is what
/// the guest computed, so a table the guest changed or a misread snapshot only means fewer matches. Anything else
/// (an index past the snapshot, an entry the guest changed, a target not in the snapshot) executes the original
/// `jmp`, which lands in the intact original. The flags and the scratch register are saved below the red zone.
/// Every in-function target gets a 5-byte pad, as loop heads do, so an evicted copy is left there too.
package struct JumpTable: Hashable, Sendable {
    /// How a dispatch reads its table.
    package enum Form: Hashable, Sendable {
        /// `jmp qword ptr [index*8 + table]`: 8-byte code addresses.
        case absolute
        /// `jmp target` after `target` = `table` + the sign-extended 32-bit entry: 4-byte offsets from the table.
        case relative
    }

    /// The dispatching `jmp`'s address in the original function.
    package var jump: UInt64
    /// The table's guest-virtual address (the `jmp`'s 32-bit absolute displacement, or the `lea`'s RIP-relative address).
    package var table: UInt64
    /// The index register (64-bit) of an absolute table; the register the `jmp` goes through for a relative one.
    package var index: X86Register
    /// The entries' code addresses as the image held them, from the first.
    package var entries: [UInt64]
    /// How the dispatch reads the table.
    package var form: Form
    /// Whether the dispatch is `notrack` (its targets need no `endbr64` under indirect branch tracking).
    package var notrack: Bool

    /// The most entries read into a snapshot.
    package static let maximumEntries = 512
    /// The most targets a relative table's dispatch in the copy compares with (the rest land in the original).
    package static let maximumCompares = 64

    /// Creates a table record.
    package init(jump: UInt64, table: UInt64, index: X86Register, entries: [UInt64], form: Form = .absolute, notrack: Bool = false) {
        self.jump = jump; self.table = table; self.index = index; self.entries = entries; self.form = form; self.notrack = notrack
    }

    /// Whether `i`'s legacy prefixes are none or `notrack` alone (`nil`: others, so no dispatch).
    private static func notrackPrefix(_ i: X86Instruction) -> Bool? {
        switch i.encoding.legacyPrefixes {
        case []: false
        case [0x3e]: true
        default: nil
        }
    }

    /// The table and index of `i` when it is an absolute jump-table dispatch: `jmp qword ptr [r*8 + disp32]` with no
    /// base and no prefix but REX and `notrack` (so no other segment override, no `bnd` or `67`), a 64-bit index other
    /// than `rsp`.
    package static func dispatch(_ i: X86Instruction) -> (table: UInt64, index: X86Register)? {
        guard i.mode == .bits64, i.mnemonic == "jmp", i.groups.contains(.indirectBranch), i.operands.count == 1,
              notrackPrefix(i) != nil, let m = i.operands[0].memory, m.base == nil, m.scale == 8, let x = m.index,
              let g = x.generalPurpose, g.width == 8, g.number != 4, m.displacement >= 0 else { return nil }
        // [3E] [REX] FF /4 with a SIB (base 101, no base) and a disp32: 7 bytes, one more for each prefix.
        var body = i.bytes[...]
        if body.first == 0x3e { body = body.dropFirst() }
        if body.first.map({ $0 & 0xf0 == 0x40 }) == true { body = body.dropFirst() }
        let b = Array(body)
        guard b.count == 7, b[0] == 0xff, b[1] == 0x24, b[2] & 7 == 5 else { return nil }
        return (UInt64(m.displacement), x)
    }

    /// The table and jump register of the instruction at index `k` of `function` when it is a relative jump-table
    /// dispatch: `jmp r64` (no prefix but REX and `notrack`) closing a straight run of at most eight instructions
    /// that holds, in this order, `lea b, [rip + table]`, `movsxd t, dword ptr [b + i*4]` and `add t, b` (or, with
    /// `t` and `b` swapped in the `movsxd`, `add b, t`), where the `add`'s destination is the jumped-through register.
    package static func relativeDispatch(at k: Int, in function: DecodedFunction) -> (table: UInt64, register: X86Register)? {
        let ins = function.instructions
        guard k < ins.count else { return nil }
        let j = ins[k]
        guard j.mode == .bits64, j.mnemonic == "jmp", j.groups.contains(.indirectBranch), j.operands.count == 1,
              notrackPrefix(j) != nil, case .register(let r) = j.operands[0].operand, let g = r.generalPurpose, g.width == 8 else { return nil }
        func register(_ o: DecodedOperand) -> X86Register? {
            if case .register(let x) = o.operand, x.generalPurpose?.width == 8 { x } else { nil }
        }
        // Walk back over the run: stop at a branch (the run is straight) or after eight instructions.
        var add: (dst: X86Register, src: X86Register)?
        var load: (dst: X86Register, base: X86Register)?
        var m = k
        while m > 0, k - m < 8 {
            m -= 1
            let i = ins[m]
            if i.groups.contains(.jump) || i.groups.contains(.call) || i.groups.contains(.return) { return nil }
            if add == nil {
                if i.mnemonic == "add", i.operands.count == 2, let d = register(i.operands[0]), let s = register(i.operands[1]), d == r {
                    add = (d, s)
                }
            } else if load == nil, let a = add {
                if i.mnemonic == "movsxd", i.operands.count == 2, let d = register(i.operands[0]), let mem = i.operands[1].memory,
                   i.operands[1].size == 4, mem.scale == 4, mem.displacement == 0, mem.segment == nil, let base = mem.base,
                   mem.index != nil, (d == a.dst && base == a.src) || (d == a.src && base == a.dst) {
                    load = (d, base)
                }
            } else if let l = load {
                if i.mnemonic == "lea", i.operands.count == 2, register(i.operands[0]) == l.base, let mem = i.operands[1].memory,
                   mem.isRIPRelative, mem.index == nil {
                    return (i.nextAddress &+ UInt64(bitPattern: mem.displacement), r)
                }
            }
        }
        return nil
    }

    /// The jump tables of `function` that `image` holds: for each dispatch (either form), the entries from the
    /// table's start while each names an address inside a sized function of the image (at most ``maximumEntries``;
    /// none: no table).
    package static func find(in function: DecodedFunction, image: CodeImage) -> [JumpTable] {
        function.instructions.indices.compactMap { k -> JumpTable? in
            let i = function.instructions[k]
            let form: Form, table: UInt64, register: X86Register
            if let d = dispatch(i) {
                (form, table, register) = (.absolute, d.table, d.index)
            } else if let d = relativeDispatch(at: k, in: function) {
                (form, table, register) = (.relative, d.table, d.register)
            } else {
                return nil
            }
            let size = form == .absolute ? 8 : 4
            var entries: [UInt64] = []
            while entries.count < maximumEntries, let b = image.bytes(at: table &+ UInt64(entries.count * size), count: size) {
                let raw = b.reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                let e = form == .absolute ? raw : table &+ UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: raw)))
                guard image.function(containing: e) != nil else { break }
                entries.append(e)
            }
            return entries.isEmpty ? nil : JumpTable(jump: i.address, table: table, index: register, entries: entries,
                                                     form: form, notrack: i.bytes.first == 0x3e)
        }
    }

    /// The entries that are instruction starts of `function` (the copy's extra edges and pads).
    package func targets(in function: DecodedFunction) -> Set<UInt64> {
        form == .absolute ? Set(entries.filter { function.index(at: $0) != nil }) : Set(comparedTargets(in: function))
    }

    /// Where the emitted dispatch wants its two tables' addresses: the offsets (from the assembler's origin) of
    /// the 32-bit displacements naming the snapshot and the translated table.
    package struct Fixups: Sendable {
        var snapshot: [Int] = []
        var translated: [Int] = []
    }

    /// The targets a relative table's dispatch in the copy compares with: the in-function entries, each once, in
    /// table order, those a sign-extended 32-bit immediate can name, at most ``maximumCompares``.
    func comparedTargets(in function: DecodedFunction) -> [UInt64] {
        var seen: Set<UInt64> = []
        return Array(entries.filter { function.index(at: $0) != nil && JumpTable.fitsDisplacement($0) && seen.insert($0).inserted }
            .prefix(JumpTable.maximumCompares))
    }

    /// Emits the dispatch for the original `jmp` `i` (see the type's description). For an absolute table the two
    /// tables' addresses go into the displacements ``Fixups`` lists, filled by ``emitTables(into:copyPoints:)``; for
    /// a relative one `copyPoint` gives the copy's point for each compared target of `function`.
    func emitDispatch(replacing i: X86Instruction, in function: DecodedFunction, into a: inout X86Assembler, fixups: inout Fixups,
                      copyPoint: (UInt64) -> X86Assembler.Target?) throws(DMPRefusal) {
        let redZone = X86Assembler.Memory(base: .rsp, displacement: -128)
        let back = X86Assembler.Memory(base: .rsp, displacement: 128)
        guard form == .absolute else {
            let hits = comparedTargets(in: function).compactMap { t in copyPoint(t).map { (t, $0, a.newLabel()) } }
            try a.lea(.rsp, redZone)
            a.pushfq()
            for (t, _, hit) in hits {
                try a.cmp(index, immediate: Int64(bitPattern: t))
                try a.jcc(.e, .label(hit))
            }
            a.popfq()
            try a.lea(.rsp, back)
            a.raw(i.bytes)
            for (_, point, hit) in hits {
                try a.bind(hit)
                a.popfq()
                try a.lea(.rsp, back)
                try a.jmp(point)
            }
            return
        }
        let scratch: X86Register = index == .rax ? .rcx : .rax
        let original = a.newLabel()
        try a.lea(.rsp, redZone)
        try a.push(scratch)
        a.pushfq()
        try a.cmp(index, immediate: Int64(entries.count))
        try a.jcc(.ae, .label(original))
        try a.mov(scratch, X86Assembler.Memory(index: index, scale: 8, displacement: Int64(table)))
        try a.arithmetic(.cmp, scratch, X86Assembler.Memory(index: index, scale: 8, displacement: 0))
        fixups.snapshot.append(Int(a.position &- a.origin) - 4)
        try a.jcc(.ne, .label(original))
        a.popfq()
        try a.pop(scratch)
        try a.lea(.rsp, back)
        if notrack { a.raw([0x3e]) }
        try a.jmpIndirect(X86Assembler.Memory(index: index, scale: 8, displacement: 0))
        fixups.translated.append(Int(a.position &- a.origin) - 4)
        try a.bind(original)
        a.popfq()
        try a.pop(scratch)
        try a.lea(.rsp, back)
        a.raw(i.bytes)
    }

    /// Emits the snapshot and the translated table (8-byte aligned) after the copy's code and returns where they
    /// are; `labels` gives each original instruction's point in the copy. Refuses addresses a sign-extended
    /// 32-bit displacement cannot name.
    func emitTables(into a: inout X86Assembler, copyPoints: (UInt64) -> UInt64?) throws(DMPRefusal) -> (snapshot: UInt64, translated: UInt64) {
        while a.position % 8 != 0 { a.raw([0xcc]) }
        let snapshot = a.position
        for e in entries { a.raw(X86Assembler.le(e, 8)) }
        let translated = a.position
        for e in entries { a.raw(X86Assembler.le(copyPoints(e) ?? e, 8)) }
        for v in [snapshot, translated &+ UInt64(entries.count * 8)] where !JumpTable.fitsDisplacement(v) {
            throw DMPRefusal(.encode, "the copy's jump table at 0x\(String(v, radix: 16)) is beyond a 32-bit displacement")
        }
        return (snapshot, translated)
    }

    /// Whether `address` is what a sign-extended 32-bit displacement names.
    static func fitsDisplacement(_ address: UInt64) -> Bool {
        let s = Int64(bitPattern: address)
        return s >= Int64(Int32.min) && s <= Int64(Int32.max)
    }

    /// Stores the tables' addresses into the displacements `fixups` lists.
    static func fill(_ bytes: inout [UInt8], fixups: Fixups, snapshot: UInt64, translated: UInt64) {
        for o in fixups.snapshot { X86Assembler.put(Int32(truncatingIfNeeded: Int64(bitPattern: snapshot)), into: &bytes, at: o) }
        for o in fixups.translated { X86Assembler.put(Int32(truncatingIfNeeded: Int64(bitPattern: translated)), into: &bytes, at: o) }
    }
}

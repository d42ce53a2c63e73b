import VMMKit
import X86Disassembler

/// A jump table a copied function dispatches through (a `switch` compiled to `jmp qword ptr [index*8 + table]`,
/// gcc's non-PIC form), with the entries the guest's image held when the copy was planned.
///
/// In the copy the dispatch stays in the copy: ``FunctionCopy`` emits, in place of the `jmp`, a check that the
/// index is below the snapshot's length and that the guest's entry still equals the snapshot's, then an indirect
/// jump through a translated table (entries inside the function go to the copy's corresponding points, others
/// stay as they are); anything else (an index past the snapshot, an entry the guest changed) executes the
/// original `jmp`, which lands in the intact original. The flags and the scratch register are saved below the
/// red zone. Every in-function target gets a 5-byte pad, as loop heads do, so an evicted copy is left there too.
package struct JumpTable: Hashable, Sendable {
    /// The dispatching `jmp`'s address in the original function.
    package var jump: UInt64
    /// The table's guest-virtual address (the `jmp`'s 32-bit absolute displacement).
    package var table: UInt64
    /// The index register (64-bit).
    package var index: X86Register
    /// The entries as the image held them, from the first.
    package var entries: [UInt64]

    /// The most entries read into a snapshot.
    package static let maximumEntries = 512

    /// Creates a table record.
    package init(jump: UInt64, table: UInt64, index: X86Register, entries: [UInt64]) {
        self.jump = jump; self.table = table; self.index = index; self.entries = entries
    }

    /// The table and index of `i` when it is a jump-table dispatch: `jmp qword ptr [r*8 + disp32]` with no base,
    /// no segment override and no prefix but REX (so no `notrack`, `bnd` or `67`), a 64-bit index other than `rsp`.
    package static func dispatch(_ i: X86Instruction) -> (table: UInt64, index: X86Register)? {
        guard i.mode == .bits64, i.mnemonic == "jmp", i.groups.contains(.indirectBranch), i.operands.count == 1,
              let m = i.operands[0].memory, m.base == nil, m.segment == nil, m.scale == 8, let x = m.index,
              let g = x.generalPurpose, g.width == 8, g.number != 4, m.displacement >= 0 else { return nil }
        // [REX] FF /4 with a SIB (base 101, no base) and a disp32: 7 bytes, 8 with REX.
        let body = i.bytes.first.map { $0 & 0xf0 == 0x40 } == true ? Array(i.bytes.dropFirst()) : i.bytes
        guard body.count == 7, body[0] == 0xff, body[1] == 0x24, body[2] & 7 == 5 else { return nil }
        return (UInt64(m.displacement), x)
    }

    /// The jump tables of `function` that `image` holds: for each dispatch, the entries from the table's start
    /// while each is an address inside a sized function of the image (at most ``maximumEntries``; none: no table).
    package static func find(in function: DecodedFunction, image: CodeImage) -> [JumpTable] {
        function.instructions.compactMap { i -> JumpTable? in
            guard let (table, index) = dispatch(i) else { return nil }
            var entries: [UInt64] = []
            while entries.count < maximumEntries,
                  let b = image.bytes(at: table &+ UInt64(entries.count * 8), count: 8) {
                let e = b.reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                guard image.function(containing: e) != nil else { break }
                entries.append(e)
            }
            return entries.isEmpty ? nil : JumpTable(jump: i.address, table: table, index: index, entries: entries)
        }
    }

    /// The entries that are instruction starts of `function` (the copy's extra edges and pads).
    package func targets(in function: DecodedFunction) -> Set<UInt64> {
        Set(entries.filter { function.index(at: $0) != nil })
    }

    /// Where the emitted dispatch wants its two tables' addresses: the offsets (from the assembler's origin) of
    /// the 32-bit displacements naming the snapshot and the translated table.
    package struct Fixups: Sendable {
        var snapshot: [Int] = []
        var translated: [Int] = []
    }

    /// Emits the dispatch for the original `jmp` `i` (see the type's description); the two tables' addresses go
    /// into the displacements ``Fixups`` lists, filled by ``emitTables(into:labels:fixups:function:)``.
    func emitDispatch(replacing i: X86Instruction, into a: inout X86Assembler, fixups: inout Fixups) throws(DMPRefusal) {
        let scratch: X86Register = index == .rax ? .rcx : .rax
        let original = a.newLabel()
        let redZone = X86Assembler.Memory(base: .rsp, displacement: -128)
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
        try a.lea(.rsp, X86Assembler.Memory(base: .rsp, displacement: 128))
        try a.jmpIndirect(X86Assembler.Memory(index: index, scale: 8, displacement: 0))
        fixups.translated.append(Int(a.position &- a.origin) - 4)
        try a.bind(original)
        a.popfq()
        try a.pop(scratch)
        try a.lea(.rsp, X86Assembler.Memory(base: .rsp, displacement: 128))
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

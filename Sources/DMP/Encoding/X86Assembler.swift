import X86Disassembler

/// DMP's own small x86-64 encoder: the instructions implanted code needs,
/// emitted at a known guest-virtual origin, with labels and rel32 fixups
/// (DESIGN.md, DMP step 4: "Stubs come from a small x86-64 encoder of ours").
///
/// Registers are ``X86Register``s (the width comes from the register);
/// memory operands are ``Memory`` values, either `[base + index × scale + disp]`
/// with 64-bit registers or an absolute guest-virtual address that the encoder
/// reaches RIP-relatively (refused with ``DMPRefusal/Stage/encode`` beyond ±2 GiB).
/// Every method that can be given an operand it cannot encode throws a
/// ``DMPRefusal`` instead of emitting something else. Every shape is
/// round-tripped through ``X86Disassembler`` in `Tests/DMPTests`.
package struct X86Assembler: Sendable {
    /// A position in the code, bound with ``bind(_:)`` (before or after the jumps that name it).
    package struct Label: Hashable, Sendable {
        fileprivate let id: Int
    }

    /// Where a jump, jcc or call goes.
    package enum Target: Hashable, Sendable {
        /// A label of this assembler.
        case label(Label)
        /// An absolute guest-virtual address (refused beyond ±2 GiB of the instruction).
        case absolute(UInt64)
    }

    /// A memory operand.
    package struct Memory: Hashable, Sendable {
        /// The base register (64-bit), if any.
        package var base: X86Register?
        /// The index register (64-bit, not `rsp`), if any.
        package var index: X86Register?
        /// The index scale: 1, 2, 4 or 8.
        package var scale: Int
        /// The displacement (must fit 32 bits signed).
        package var displacement: Int64
        /// For a RIP-relative operand: the absolute guest-virtual address it names.
        package var absolute: UInt64?

        /// `[base + index × scale + displacement]`.
        package init(base: X86Register? = nil, index: X86Register? = nil, scale: Int = 1, displacement: Int64 = 0) {
            self.base = base; self.index = index; self.scale = scale; self.displacement = displacement; self.absolute = nil
        }

        /// The absolute guest-virtual `address`, encoded RIP-relatively.
        package static func at(_ address: UInt64) -> Memory {
            var m = Memory()
            m.absolute = address
            return m
        }
    }

    /// A condition code (the low nibble of `jcc`).
    package enum Condition: UInt8, Hashable, Sendable, CaseIterable {
        case o = 0, no, b, ae, e, ne, be, a, s, ns, p, np, l, ge, le, g
    }

    /// The two-operand arithmetic and logic group (the ModRM `reg` digit of `80`/`81`/`83`).
    package enum ArithmeticOperation: UInt8, Hashable, Sendable {
        case add = 0, or = 1, and = 4, sub = 5, xor = 6, cmp = 7
    }

    /// The guest-virtual address of the first byte.
    package let origin: UInt64
    /// The bytes emitted so far (rel32 fields to labels not yet bound hold zero until ``finish()``).
    package private(set) var bytes: [UInt8] = []
    private var labelOffsets: [Int?] = []
    /// rel32 (or, for `jrcxz`, rel8) fields to patch: the field's offset, the label, the offset the field counts
    /// from (the next instruction), the field's size.
    private var fixups: [(field: Int, label: Label, end: Int, size: Int)] = []

    /// An assembler whose first byte will be at `origin`.
    package init(origin: UInt64) { self.origin = origin }

    /// The guest-virtual address of the next byte.
    package var position: UInt64 { origin &+ UInt64(bytes.count) }

    // MARK: - Labels

    /// A new, unbound label.
    package mutating func newLabel() -> Label {
        labelOffsets.append(nil)
        return Label(id: labelOffsets.count - 1)
    }

    /// Binds `label` to the current position (once).
    package mutating func bind(_ label: Label) throws(DMPRefusal) {
        guard label.id < labelOffsets.count, labelOffsets[label.id] == nil else {
            throw DMPRefusal(.encode, "label \(label.id) bound twice or not from this assembler")
        }
        labelOffsets[label.id] = bytes.count
    }

    /// The guest-virtual address of a bound label (`nil` while unbound).
    package func address(of label: Label) -> UInt64? {
        guard label.id < labelOffsets.count, let o = labelOffsets[label.id] else { return nil }
        return origin &+ UInt64(o)
    }

    /// The code with every label fixup resolved; refuses a label that was used but never bound, and a short
    /// (`jrcxz`) jump to a label beyond rel8 reach.
    package func finish() throws(DMPRefusal) -> [UInt8] {
        var out = bytes
        for f in fixups {
            guard let target = labelOffsets[f.label.id] else {
                throw DMPRefusal(.encode, "label \(f.label.id) used but never bound")
            }
            if f.size == 1 {
                guard (-128...127).contains(target - f.end) else {
                    throw DMPRefusal(.encode, "label \(f.label.id) is \(target - f.end) bytes from a jrcxz (rel8 reaches -128...127)")
                }
                out[f.field] = UInt8(bitPattern: Int8(target - f.end))
            } else {
                Self.put(Int32(target - f.end), into: &out, at: f.field)
            }
        }
        return out
    }

    // MARK: - Raw bytes and padding

    /// Appends bytes as they are.
    package mutating func raw(_ b: [UInt8]) { bytes += b }

    /// The recommended multi-byte NOPs, 1 to 9 bytes (5: `0f 1f 44 00 00`).
    package static let nops: [[UInt8]] = [
        [0x90],
        [0x66, 0x90],
        [0x0f, 0x1f, 0x00],
        [0x0f, 0x1f, 0x40, 0x00],
        [0x0f, 0x1f, 0x44, 0x00, 0x00],
        [0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
        [0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
        [0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        [0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    ]

    /// `count` bytes of padding as the fewest NOPs (each at most 9 bytes).
    package mutating func nop(_ count: Int) {
        var left = count
        while left > 0 {
            let n = min(left, 9)
            bytes += X86Assembler.nops[n - 1]
            left -= n
        }
    }

    /// `pause` (`f3 90`).
    package mutating func pause() { bytes += [0xf3, 0x90] }
    /// `pushfq` (`9c`).
    package mutating func pushfq() { bytes.append(0x9c) }
    /// `popfq` (`9d`).
    package mutating func popfq() { bytes.append(0x9d) }
    /// `lahf` (`9f`): SF, ZF, AF, PF and CF into `ah` (64-bit mode needs CPUID 8000_0001h ECX bit 0).
    package mutating func lahf() { bytes.append(0x9f) }
    /// `sahf` (`9e`): SF, ZF, AF, PF and CF from `ah` (OF and every other flag unchanged).
    package mutating func sahf() { bytes.append(0x9e) }
    /// `seto al` (`0f 90 c0`): `al` = OF.
    package mutating func setoAL() { bytes += [0x0f, 0x90, 0xc0] }
    /// `add al, imm8` (`04 ib`).
    package mutating func addAL(_ imm: UInt8) { bytes += [0x04, imm] }

    // MARK: - Moves

    /// `mov dst, src` between two general-purpose registers of the same width.
    package mutating func mov(_ dst: X86Register, _ src: X86Register) throws(DMPRefusal) {
        let (d, s) = try (gpr(dst), gpr(src))
        guard d.width == s.width else { throw mismatch("mov", dst, src) }
        try encode(width: d.width, opcode: [d.width == 1 ? 0x88 : 0x89], reg: s.number, rm: .register(d.number), byteRegisters: [dst, src])
    }

    /// `mov dst, [m]`: a load of `dst`'s width (8- and 16-bit loads keep the upper bits, 32-bit ones clear them).
    package mutating func mov(_ dst: X86Register, _ m: Memory) throws(DMPRefusal) {
        let d = try gpr(dst)
        try encode(width: d.width, opcode: [d.width == 1 ? 0x8a : 0x8b], reg: d.number, rm: .memory(m), byteRegisters: [dst])
    }

    /// `mov [m], src`: a store of `src`'s width.
    package mutating func mov(_ m: Memory, _ src: X86Register) throws(DMPRefusal) {
        let s = try gpr(src)
        try encode(width: s.width, opcode: [s.width == 1 ? 0x88 : 0x89], reg: s.number, rm: .memory(m), byteRegisters: [src])
    }

    /// `mov dst, imm` with `dst`'s width semantics (8/16 keep the upper bits, 32 clears them); `imm`
    /// is truncated to the width. A 64-bit destination takes the shortest exact form
    /// (`mov r32, imm32` when the value fits 32 bits unsigned, `mov r/m64, imm32` sign-extended, else `movabs`).
    package mutating func mov(_ dst: X86Register, immediate imm: UInt64) throws(DMPRefusal) {
        let d = try gpr(dst)
        let r = UInt8(d.number & 7)
        switch d.width {
        case 1:
            try encode(width: 1, opcode: [0xb0 + r], reg: 0, rm: .none(extension: d.number), byteRegisters: [dst],
                       immediate: Self.le(imm, 1))
        case 2: try encode(width: 2, opcode: [0xb8 + r], reg: 0, rm: .none(extension: d.number), immediate: Self.le(imm, 2))
        case 4: try encode(width: 4, opcode: [0xb8 + r], reg: 0, rm: .none(extension: d.number), immediate: Self.le(imm, 4))
        default:
            if imm <= UInt64(UInt32.max) {
                try encode(width: 4, opcode: [0xb8 + r], reg: 0, rm: .none(extension: d.number), immediate: Self.le(imm, 4))
            } else if Self.fitsInt32(Int64(bitPattern: imm)) {
                try encode(width: 8, opcode: [0xc7], reg: 0, rm: .register(d.number), immediate: Self.le(imm, 4))
            } else {
                try encode(width: 8, opcode: [0xb8 + r], reg: 0, rm: .none(extension: d.number), immediate: Self.le(imm, 8))
            }
        }
    }

    /// `mov [m], imm` of `width` bytes (1, 2, 4; 8 stores a sign-extended 32-bit immediate and refuses others).
    package mutating func mov(_ m: Memory, width: Int, immediate imm: Int64) throws(DMPRefusal) {
        try checkWidth(width)
        if width == 8 && !Self.fitsInt32(imm) { throw DMPRefusal(.encode, "a 64-bit store takes a sign-extended 32-bit immediate, not \(imm)") }
        try encode(width: width, opcode: [width == 1 ? 0xc6 : 0xc7], reg: 0, rm: .memory(m),
                   immediate: Self.le(UInt64(bitPattern: imm), min(width, 4)))
    }

    /// `movzx dst, src` from an 8- or 16-bit register.
    package mutating func movzx(_ dst: X86Register, _ src: X86Register) throws(DMPRefusal) {
        try extend(0xb6, dst, source: src)
    }

    /// `movzx dst, [m]` loading `width` (1 or 2) bytes.
    package mutating func movzx(_ dst: X86Register, _ m: Memory, width: Int) throws(DMPRefusal) {
        try extend(0xb6, dst, memory: m, width: width)
    }

    /// `movsx dst, src` from an 8- or 16-bit register, or `movsxd dst, src` from a 32-bit one.
    package mutating func movsx(_ dst: X86Register, _ src: X86Register) throws(DMPRefusal) {
        try extend(0xbe, dst, source: src)
    }

    /// `movsx dst, [m]` loading `width` (1 or 2) bytes, or `movsxd dst, [m]` loading 4.
    package mutating func movsx(_ dst: X86Register, _ m: Memory, width: Int) throws(DMPRefusal) {
        try extend(0xbe, dst, memory: m, width: width)
    }

    private mutating func extend(_ base: UInt8, _ dst: X86Register, source: X86Register) throws(DMPRefusal) {
        let (d, s) = try (gpr(dst), gpr(source))
        try extend(base, d, dst, rm: .register(s.number), width: s.width, byteRegisters: [dst, source])
    }

    private mutating func extend(_ base: UInt8, _ dst: X86Register, memory m: Memory, width: Int) throws(DMPRefusal) {
        try extend(base, try gpr(dst), dst, rm: .memory(m), width: width, byteRegisters: [dst])
    }

    private mutating func extend(_ base: UInt8, _ d: GPR, _ dst: X86Register, rm: RM, width: Int,
                                 byteRegisters: [X86Register]) throws(DMPRefusal) {
        guard width < d.width, d.width >= 2, [1, 2, 4].contains(width) else {
            throw DMPRefusal(.encode, "cannot extend \(width) bytes into \(dst)")
        }
        if width == 4 {
            guard base == 0xbe, d.width == 8 else { throw DMPRefusal(.encode, "a 32-bit source extends only by movsxd into 64 bits") }
            try encode(width: 8, opcode: [0x63], reg: d.number, rm: rm, byteRegisters: byteRegisters)
        } else {
            try encode(width: d.width, opcode: [0x0f, base + (width == 2 ? 1 : 0)], reg: d.number, rm: rm, byteRegisters: byteRegisters)
        }
    }

    /// `lea dst, [m]` (32- or 64-bit destination).
    package mutating func lea(_ dst: X86Register, _ m: Memory) throws(DMPRefusal) {
        let d = try gpr(dst)
        guard d.width >= 4 else { throw DMPRefusal(.encode, "lea into \(dst): only 32- and 64-bit destinations") }
        try encode(width: d.width, opcode: [0x8d], reg: d.number, rm: .memory(m))
    }

    /// `push r64`.
    package mutating func push(_ r: X86Register) throws(DMPRefusal) {
        let g = try gpr(r)
        guard g.width == 8 else { throw DMPRefusal(.encode, "push \(r): only 64-bit registers") }
        try encode(width: 4, opcode: [0x50 + UInt8(g.number & 7)], reg: 0, rm: .none(extension: g.number))
    }

    /// `pop r64`.
    package mutating func pop(_ r: X86Register) throws(DMPRefusal) {
        let g = try gpr(r)
        guard g.width == 8 else { throw DMPRefusal(.encode, "pop \(r): only 64-bit registers") }
        try encode(width: 4, opcode: [0x58 + UInt8(g.number & 7)], reg: 0, rm: .none(extension: g.number))
    }

    // MARK: - Arithmetic and logic

    /// `op dst, src` (`add`, `or`, `and`, `sub`, `xor`, `cmp`) between registers of one width.
    package mutating func arithmetic(_ op: ArithmeticOperation, _ dst: X86Register, _ src: X86Register) throws(DMPRefusal) {
        let (d, s) = try (gpr(dst), gpr(src))
        guard d.width == s.width else { throw mismatch("\(op)", dst, src) }
        try encode(width: d.width, opcode: [op.rawValue << 3 | (d.width == 1 ? 0 : 1)], reg: s.number, rm: .register(d.number),
                   byteRegisters: [dst, src])
    }

    /// `op dst, [m]` with `dst`'s width.
    package mutating func arithmetic(_ op: ArithmeticOperation, _ dst: X86Register, _ m: Memory) throws(DMPRefusal) {
        let d = try gpr(dst)
        try encode(width: d.width, opcode: [op.rawValue << 3 | (d.width == 1 ? 2 : 3)], reg: d.number, rm: .memory(m), byteRegisters: [dst])
    }

    /// `op [m], src` with `src`'s width.
    package mutating func arithmetic(_ op: ArithmeticOperation, _ m: Memory, _ src: X86Register) throws(DMPRefusal) {
        let s = try gpr(src)
        try encode(width: s.width, opcode: [op.rawValue << 3 | (s.width == 1 ? 0 : 1)], reg: s.number, rm: .memory(m), byteRegisters: [src])
    }

    /// `op dst, imm` (the short sign-extended imm8 form where it fits; 64-bit takes a sign-extended imm32).
    package mutating func arithmetic(_ op: ArithmeticOperation, _ dst: X86Register, immediate imm: Int64) throws(DMPRefusal) {
        let d = try gpr(dst)
        try arithmeticImmediate(op, width: d.width, rm: .register(d.number), imm, byteRegisters: [dst])
    }

    /// `op [m], imm` on `width` bytes.
    package mutating func arithmetic(_ op: ArithmeticOperation, _ m: Memory, width: Int, immediate imm: Int64) throws(DMPRefusal) {
        try checkWidth(width)
        try arithmeticImmediate(op, width: width, rm: .memory(m), imm, byteRegisters: [])
    }

    private mutating func arithmeticImmediate(_ op: ArithmeticOperation, width: Int, rm: RM, _ imm: Int64,
                                              byteRegisters: [X86Register]) throws(DMPRefusal) {
        let imm = try truncatedImmediate(imm, width: width)
        if width == 1 {
            try encode(width: 1, opcode: [0x80], reg: Int(op.rawValue), rm: rm, byteRegisters: byteRegisters, immediate: Self.le(UInt64(bitPattern: imm), 1))
        } else if (-128...127).contains(imm) {
            try encode(width: width, opcode: [0x83], reg: Int(op.rawValue), rm: rm, immediate: Self.le(UInt64(bitPattern: imm), 1))
        } else {
            try encode(width: width, opcode: [0x81], reg: Int(op.rawValue), rm: rm, immediate: Self.le(UInt64(bitPattern: imm), min(width, 4)))
        }
    }

    /// `add dst, src`.
    package mutating func add(_ dst: X86Register, _ src: X86Register) throws(DMPRefusal) { try arithmetic(.add, dst, src) }
    /// `add dst, imm`.
    package mutating func add(_ dst: X86Register, immediate imm: Int64) throws(DMPRefusal) { try arithmetic(.add, dst, immediate: imm) }
    /// `sub dst, src`.
    package mutating func sub(_ dst: X86Register, _ src: X86Register) throws(DMPRefusal) { try arithmetic(.sub, dst, src) }
    /// `sub dst, imm`.
    package mutating func sub(_ dst: X86Register, immediate imm: Int64) throws(DMPRefusal) { try arithmetic(.sub, dst, immediate: imm) }
    /// `cmp a, b`.
    package mutating func cmp(_ a: X86Register, _ b: X86Register) throws(DMPRefusal) { try arithmetic(.cmp, a, b) }
    /// `cmp a, imm`.
    package mutating func cmp(_ a: X86Register, immediate imm: Int64) throws(DMPRefusal) { try arithmetic(.cmp, a, immediate: imm) }
    /// `cmp [m], imm` on `width` bytes.
    package mutating func cmp(_ m: Memory, width: Int, immediate imm: Int64) throws(DMPRefusal) {
        try arithmetic(.cmp, m, width: width, immediate: imm)
    }
    /// `and dst, imm`.
    package mutating func and(_ dst: X86Register, immediate imm: Int64) throws(DMPRefusal) { try arithmetic(.and, dst, immediate: imm) }
    /// `or dst, src`.
    package mutating func or(_ dst: X86Register, _ src: X86Register) throws(DMPRefusal) { try arithmetic(.or, dst, src) }

    /// `test a, b`.
    package mutating func test(_ a: X86Register, _ b: X86Register) throws(DMPRefusal) {
        let (x, y) = try (gpr(a), gpr(b))
        guard x.width == y.width else { throw mismatch("test", a, b) }
        try encode(width: x.width, opcode: [x.width == 1 ? 0x84 : 0x85], reg: y.number, rm: .register(x.number), byteRegisters: [a, b])
    }

    /// `test [m], imm` on `width` bytes.
    package mutating func test(_ m: Memory, width: Int, immediate imm: Int64) throws(DMPRefusal) {
        try checkWidth(width)
        let imm = try truncatedImmediate(imm, width: width)
        try encode(width: width, opcode: [width == 1 ? 0xf6 : 0xf7], reg: 0, rm: .memory(m),
                   immediate: Self.le(UInt64(bitPattern: imm), min(width, 4)))
    }

    /// `inc r`.
    package mutating func inc(_ r: X86Register) throws(DMPRefusal) { try incdec(0, r) }
    /// `dec r`.
    package mutating func dec(_ r: X86Register) throws(DMPRefusal) { try incdec(1, r) }
    /// `inc [m]` on `width` bytes (plain, not locked).
    package mutating func inc(_ m: Memory, width: Int) throws(DMPRefusal) {
        try checkWidth(width)
        try encode(width: width, opcode: [width == 1 ? 0xfe : 0xff], reg: 0, rm: .memory(m))
    }

    /// `lock inc [m]` on `width` bytes: no increment is lost to another vCPU's at the same time.
    package mutating func lockInc(_ m: Memory, width: Int) throws(DMPRefusal) {
        try checkWidth(width)
        try encode(prefixes: [0xf0], width: width, opcode: [width == 1 ? 0xfe : 0xff], reg: 0, rm: .memory(m))
    }

    /// `lock add [m], src` with `src`'s width: no addition is lost to another vCPU's at the same time.
    package mutating func lockAdd(_ m: Memory, _ src: X86Register) throws(DMPRefusal) {
        let s = try gpr(src)
        try encode(prefixes: [0xf0], width: s.width, opcode: [ArithmeticOperation.add.rawValue << 3 | (s.width == 1 ? 0 : 1)],
                   reg: s.number, rm: .memory(m), byteRegisters: [src])
    }

    private mutating func incdec(_ digit: Int, _ r: X86Register) throws(DMPRefusal) {
        let g = try gpr(r)
        try encode(width: g.width, opcode: [g.width == 1 ? 0xfe : 0xff], reg: digit, rm: .register(g.number), byteRegisters: [r])
    }

    /// `shl r, count`.
    package mutating func shl(_ r: X86Register, _ count: UInt8) throws(DMPRefusal) { try shift(4, r, count) }
    /// `shr r, count`.
    package mutating func shr(_ r: X86Register, _ count: UInt8) throws(DMPRefusal) { try shift(5, r, count) }

    private mutating func shift(_ digit: Int, _ r: X86Register, _ count: UInt8) throws(DMPRefusal) {
        let g = try gpr(r)
        try encode(width: g.width, opcode: [g.width == 1 ? 0xc0 : 0xc1], reg: digit, rm: .register(g.number), byteRegisters: [r],
                   immediate: [count])
    }

    /// `shrd dst, src, count`: `dst` shifted right, its top bits filled from `src` (registers of one width, 16 to 64 bits).
    package mutating func shrd(_ dst: X86Register, _ src: X86Register, _ count: UInt8) throws(DMPRefusal) {
        let (d, s) = try (gpr(dst), gpr(src))
        guard d.width == s.width, d.width >= 2 else { throw mismatch("shrd", dst, src) }
        try encode(width: d.width, opcode: [0x0f, 0xac], reg: s.number, rm: .register(d.number), immediate: [count])
    }

    /// `mul r64`: `rdx:rax = rax × r` (unsigned, 128 bits).
    package mutating func mul(_ r: X86Register) throws(DMPRefusal) {
        let g = try gpr(r)
        guard g.width == 8 else { throw DMPRefusal(.encode, "mul \(r): only the 64-bit form") }
        try encode(width: 8, opcode: [0xf7], reg: 4, rm: .register(g.number))
    }

    /// `rdtsc` (`0f 31`): `edx:eax` = the time-stamp counter.
    package mutating func rdtsc() { bytes += [0x0f, 0x31] }

    /// `lock cmpxchg [m], r64`: 8 bytes, compared with `rax` (the only compare-and-exchange implanted code uses).
    package mutating func lockCmpxchg(_ m: Memory, _ r: X86Register) throws(DMPRefusal) {
        let g = try gpr(r)
        guard g.width == 8 else { throw DMPRefusal(.encode, "lock cmpxchg with \(r): only the 8-byte form") }
        try encode(prefixes: [0xf0], width: 8, opcode: [0x0f, 0xb1], reg: g.number, rm: .memory(m))
    }

    // MARK: - Port I/O

    /// `in al/ax/eax, imm8` (`width` 1, 2 or 4).
    package mutating func inPort(width: Int, port: UInt8) throws(DMPRefusal) {
        try portIO(width: width, opcode: 0xe4, port: port)
    }

    /// `in al/ax/eax, dx` (`width` 1, 2 or 4).
    package mutating func inDX(width: Int) throws(DMPRefusal) { try portIO(width: width, opcode: 0xec, port: nil) }

    /// `out imm8, al/ax/eax` (`width` 1, 2 or 4).
    package mutating func outPort(width: Int, port: UInt8) throws(DMPRefusal) {
        try portIO(width: width, opcode: 0xe6, port: port)
    }

    /// `out dx, al/ax/eax` (`width` 1, 2 or 4).
    package mutating func outDX(width: Int) throws(DMPRefusal) { try portIO(width: width, opcode: 0xee, port: nil) }

    private mutating func portIO(width: Int, opcode: UInt8, port: UInt8?) throws(DMPRefusal) {
        guard [1, 2, 4].contains(width) else { throw DMPRefusal(.encode, "port I/O of \(width) bytes") }
        if width == 2 { bytes.append(0x66) }
        bytes.append(opcode + (width == 1 ? 0 : 1))
        if let port { bytes.append(port) }
    }

    // MARK: - Branches

    /// `jmp qword ptr [m]` (an indirect jump through memory; a jump table's dispatch).
    package mutating func jmpIndirect(_ m: Memory) throws(DMPRefusal) {
        try encode(width: 4, opcode: [0xff], reg: 4, rm: .memory(m))
    }

    /// `jmp rel32`.
    package mutating func jmp(_ target: Target) throws(DMPRefusal) { try branch([0xe9], target) }
    /// `jcc rel32`.
    package mutating func jcc(_ condition: Condition, _ target: Target) throws(DMPRefusal) {
        try branch([0x0f, 0x80 | condition.rawValue], target)
    }
    /// `call rel32`.
    package mutating func call(_ target: Target) throws(DMPRefusal) { try branch([0xe8], target) }

    /// `jrcxz rel8` to `label` (bound within -128...127 bytes of the next instruction, checked by ``finish()``):
    /// a branch on RCX = 0 that reads and writes no flag.
    package mutating func jrcxz(_ label: Label) throws(DMPRefusal) {
        guard label.id < labelOffsets.count else { throw DMPRefusal(.encode, "label \(label.id) is not from this assembler") }
        bytes += [0xe3, 0]
        fixups.append((bytes.count - 1, label, bytes.count, 1))
    }

    private mutating func branch(_ opcode: [UInt8], _ target: Target) throws(DMPRefusal) {
        let end = bytes.count + opcode.count + 4
        var rel: Int32 = 0
        switch target {
        case .label(let l):
            guard l.id < labelOffsets.count else { throw DMPRefusal(.encode, "label \(l.id) is not from this assembler") }
            fixups.append((end - 4, l, end, 4))
        case .absolute(let a):
            rel = try relative(a, from: origin &+ UInt64(end))
        }
        bytes += opcode + [0, 0, 0, 0]
        Self.put(rel, into: &bytes, at: end - 4)
    }

    /// The rel32 from `next` to `target`, refused beyond ±2 GiB.
    package static func rel32(to target: UInt64, from next: UInt64) -> Int32? {
        let d = Int64(bitPattern: target &- next)
        return Self.fitsInt32(d) ? Int32(d) : nil
    }

    private func relative(_ target: UInt64, from next: UInt64) throws(DMPRefusal) -> Int32 {
        guard let d = X86Assembler.rel32(to: target, from: next) else {
            throw DMPRefusal(.encode, "0x\(String(target, radix: 16)) is beyond ±2 GiB of 0x\(String(next, radix: 16))")
        }
        return d
    }

    // MARK: - The encoder core

    /// A general-purpose register as the encoder needs it: its encoding number (`ah`..`bh` are 4–7 without REX) and width.
    private struct GPR { var number: Int; var width: Int }

    private func gpr(_ r: X86Register) throws(DMPRefusal) -> GPR {
        guard let g = r.generalPurpose else { throw DMPRefusal(.encode, "\(r) is not a general-purpose register") }
        return GPR(number: g.highByte ? g.number + 4 : g.number, width: g.width)
    }

    private func checkWidth(_ w: Int) throws(DMPRefusal) {
        guard [1, 2, 4, 8].contains(w) else { throw DMPRefusal(.encode, "operand width \(w)") }
    }

    private func mismatch(_ what: String, _ a: X86Register, _ b: X86Register) -> DMPRefusal {
        DMPRefusal(.encode, "\(what) \(a), \(b): the registers differ in width")
    }

    /// `imm` as the width's signed value; refuses a value that does not fit (unsigned values of the width are accepted).
    private func truncatedImmediate(_ imm: Int64, width: Int) throws(DMPRefusal) -> Int64 {
        switch width {
        case 1 where (-128...255).contains(imm): return Int64(Int8(truncatingIfNeeded: imm))
        case 2 where (-32768...65535).contains(imm): return Int64(Int16(truncatingIfNeeded: imm))
        case 4 where (Int64(Int32.min)...Int64(UInt32.max)).contains(imm): return Int64(Int32(truncatingIfNeeded: imm))
        case 8 where Self.fitsInt32(imm): return imm
        default: throw DMPRefusal(.encode, "immediate \(imm) does not fit a \(width)-byte operation")
        }
    }

    /// The r/m side of an instruction.
    private enum RM {
        /// A register in ModRM.rm.
        case register(Int)
        /// A memory operand.
        case memory(Memory)
        /// No ModRM: the register is in the opcode's low bits; `extension` gives REX.B.
        case none(extension: Int)
    }

    /// Emits `[prefixes] [66] [REX] opcode [ModRM [SIB] [disp]] [immediate]`.
    private mutating func encode(prefixes: [UInt8] = [], width: Int, opcode: [UInt8], reg: Int, rm: RM,
                                 byteRegisters: [X86Register] = [], immediate: [UInt8] = []) throws(DMPRefusal) {
        let rexW = width == 8, rexR = reg >= 8
        var rexX = false, rexB = false
        var tail: [UInt8] = []
        var ripField: (offset: Int, target: UInt64)?
        switch rm {
        case .none(let ext):
            rexB = ext >= 8
        case .register(let n):
            rexB = n >= 8
            tail.append(0xc0 | UInt8(reg & 7) << 3 | UInt8(n & 7))
        case .memory(let m):
            if let a = m.absolute {
                tail.append(UInt8(reg & 7) << 3 | 5)
                ripField = (tail.count, a)
                tail += [0, 0, 0, 0]
            } else {
                let (modrm, x, b) = try memoryBytes(m, reg: reg)
                tail += modrm
                rexX = x; rexB = b
            }
        }
        var needsREX = rexW || rexR || rexX || rexB
        var forbidsREX = false
        for r in byteRegisters {
            guard let g = r.generalPurpose, g.width == 1 else { continue }
            if g.highByte { forbidsREX = true } else if (4...7).contains(g.number) { needsREX = true }
        }
        if needsREX && forbidsREX {
            throw DMPRefusal(.encode, "\(byteRegisters.map(\.description).joined(separator: ", ")): a high-byte register cannot be encoded with REX")
        }
        var out = prefixes
        if width == 2 { out.append(0x66) }
        if needsREX {
            out.append(0x40 | (rexW ? 8 : 0) | (rexR ? 4 : 0) | (rexX ? 2 : 0) | (rexB ? 1 : 0))
        }
        out += opcode
        let tailStart = out.count
        out += tail
        out += immediate
        if let (offset, target) = ripField {
            let next = position &+ UInt64(out.count)
            Self.put(try relative(target, from: next), into: &out, at: tailStart + offset)
        }
        bytes += out
    }

    /// ModRM, SIB and displacement for `[base + index × scale + disp]`, and REX.X / REX.B.
    private func memoryBytes(_ m: Memory, reg: Int) throws(DMPRefusal) -> ([UInt8], Bool, Bool) {
        guard Self.fitsInt32(m.displacement) else { throw DMPRefusal(.encode, "displacement \(m.displacement) beyond 32 bits") }
        let disp = Int32(m.displacement)
        let base = try m.base.map { r throws(DMPRefusal) in try address(r) }
        let index = try m.index.map { r throws(DMPRefusal) in try address(r) }
        guard [1, 2, 4, 8].contains(m.scale) else { throw DMPRefusal(.encode, "scale \(m.scale)") }
        if index == 4 { throw DMPRefusal(.encode, "rsp cannot be an index") }
        let scaleBits = UInt8(m.scale.trailingZeroBitCount) << 6
        let r = UInt8(reg & 7) << 3
        guard let b = base else {
            // No base: [index*scale + disp32] or an absolute disp32, both through a SIB with base 101.
            let sib = scaleBits | UInt8((index ?? 4) & 7) << 3 | 5
            return ([r | 4, sib] + Self.le(UInt64(bitPattern: Int64(disp)), 4), (index ?? 0) >= 8, false)
        }
        let mod: UInt8, dispBytes: [UInt8]
        if disp == 0 && b & 7 != 5 { mod = 0; dispBytes = [] }
        else if (-128...127).contains(disp) { mod = 1; dispBytes = [UInt8(bitPattern: Int8(disp))] }
        else { mod = 2; dispBytes = Self.le(UInt64(bitPattern: Int64(disp)), 4) }
        if index != nil || b & 7 == 4 {
            let sib = scaleBits | UInt8((index ?? 4) & 7) << 3 | UInt8(b & 7)
            return ([mod << 6 | r | 4, sib] + dispBytes, (index ?? 0) >= 8, b >= 8)
        }
        return ([mod << 6 | r | UInt8(b & 7)] + dispBytes, false, b >= 8)
    }

    /// The number of a 64-bit address register.
    private func address(_ r: X86Register) throws(DMPRefusal) -> Int {
        guard let g = r.generalPurpose, g.width == 8 else {
            throw DMPRefusal(.encode, "\(r) as an address register: only 64-bit registers (no 67 prefix)")
        }
        return g.number
    }

    // MARK: - Little-endian helpers

    /// Whether `v` fits a signed 32-bit field.
    static func fitsInt32(_ v: Int64) -> Bool { v >= Int64(Int32.min) && v <= Int64(Int32.max) }

    /// The low `count` bytes of `v`, little-endian.
    static func le(_ v: UInt64, _ count: Int) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

    /// Stores `v` little-endian at `offset`.
    static func put(_ v: Int32, into bytes: inout [UInt8], at offset: Int) {
        let u = UInt32(bitPattern: v)
        for k in 0..<4 { bytes[offset + k] = UInt8(truncatingIfNeeded: u >> (8 * UInt32(k))) }
    }
}

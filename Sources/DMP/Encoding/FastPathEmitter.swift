import VMMKit
import X86Disassembler

/// Emits the implanted code that serves one hot instruction in the guest
/// (DESIGN.md, DMP steps 3 and 4): a *body* with exactly the architectural
/// effect of the instruction, through the fast paths its routes grant.
///
/// Only plain loads, stores and IN/OUT qualify (`in al/ax/eax, dx|imm8`,
/// `out dx|imm8, al/ax/eax`, `mov reg, [mem]`, `mov [mem], reg|imm`,
/// `movzx`/`movsx`/`movsxd` loads); everything else is refused with a reason.
///
/// The body's shape:
///
/// ```
///         lea rsp, [rsp - 128]        ; below the red zone (at CPL0 too); skipped when nothing is pushed
///         pushfq                      ; skipped where the arithmetic flags are dead, or saved by lahf below
///         push <scratch>...           ; at most 64 bytes with the flags (and a port kick's rdx)
///         lea A, [<the operand>]      ; a register-based memory operand: its runtime address
///         movzx V, <source>           ; a store to a ring: the value, captured first
///         lahf; seto al; push rax     ; the flags (CPUs with LAHF in 64-bit mode; rax saved above)
///         shl V, 32
///   route i:
///         cmp dx, port | cmp A, addr  ; the runtime port or address (static ones are checked here, in Swift)
///         jne route i+1
///         cmp dword [enable_i], 0     ; the device's enable word
///         je fallback
///         <rings empty?>              ; a read not independent of the device's pending ring entries
///         <serve>                     ; constant, shared slot, discard, ring append (may go to fallback)
///         inc qword [hits_i]         ; lock inc with several vCPUs (DMPConfiguration.lockedCounters)
///         jmp done
///   fallback:
///         <restore>
///         <the original instruction, relocated>   ; it exits and the device handles it
///         jmp end
///   done:
///         <restore>                   ; pop rax; add al, 0x7f; sahf (lahf) - pop...; popfq (pushfq); lea rsp, [rsp + 128]
///   end:
/// ```
///
/// A ring append looks at the ring's wake flag (the polling consumer sleeps) before
/// it claims a slot, and then executes the original instruction instead: that exit
/// applies the ring's entries first and wakes the poller. After publishing it looks
/// again and, set, writes the rings' kick register (``RingMapping/kick``) as
/// `Guests/include/ring.inc` does (a poller that fell asleep between the two looks
/// is woken, not left with an entry until the drain timer). Each look is one
/// `test` of the header line the append reads anyway; an exit only when set.
///
/// Every register and flag the original does not define is preserved (IN, OUT and
/// MOV define none but their destination); scratch registers are ones the
/// instruction does not name, except `rax` for a ring's `lock cmpxchg` and for
/// `lahf`, which is saved and whose value is captured first (a port kick saves
/// `rdx` around its `out` only).
package enum FastPathEmitter {
    /// The bytes below RSP the body steps over before it pushes (the System V red zone).
    package static let redZone: Int64 = 128
    /// The most stack the body uses below the red zone.
    package static let stackLimit = 64

    /// Emits the body for `instruction` serving `routes` at `assembler`'s current position.
    ///
    /// - Throws: ``DMPRefusal`` with stage ``DMPRefusal/Stage/fastPath`` when the
    ///   instruction or a route does not qualify, ``DMPRefusal/Stage/encode`` when
    ///   an address is beyond ±2 GiB of the body or the original cannot be relocated.
    ///   On a refusal nothing is emitted.
    ///
    /// - Parameters:
    ///   - preserveFlags: `false` skips saving the flags where the arithmetic flags are
    ///     dead after the instruction (``arithmeticFlagsDead(before:)``); the body changes no other flag.
    ///   - lahf: the CPU runs `lahf`/`sahf` in 64-bit mode (CPUID 8000_0001h ECX bit 0): preserved
    ///     flags are saved with `lahf`/`seto al` and restored with `add al, 0x7f`/`sahf`, a few cycles
    ///     where `popfq` costs more than the rest of a constant read. Not for a read into `rax`
    ///     (`pushfq`/`popfq` then).
    @discardableResult
    package static func emitBody(for instruction: X86Instruction, routes: [FastPathRoute], preserveFlags: Bool = true,
                                 lahf: Bool = false, into assembler: inout X86Assembler) throws(DMPRefusal) -> FastPathBody {
        var a = assembler
        var e = try BodyEmitter(instruction: instruction, routes: routes, preserveFlags: preserveFlags, lahf: lahf)
        let body = try e.emit(into: &a)
        assembler = a
        return body
    }

    /// The body alone, emitted at `origin` (a function copy's inline rewrite: it falls through).
    package static func bodyBytes(for instruction: X86Instruction, routes: [FastPathRoute], preserveFlags: Bool = true,
                                  lahf: Bool = false, at origin: UInt64) throws(DMPRefusal) -> [UInt8] {
        var a = X86Assembler(origin: origin)
        try emitBody(for: instruction, routes: routes, preserveFlags: preserveFlags, lahf: lahf, into: &a)
        return try a.finish()
    }

    /// An instruction stub: the body, then `jmp` to the end of the instruction (never `ret`).
    /// Returns the stub's bytes (for `origin`) and where its parts are.
    package static func instructionStub(for instruction: X86Instruction, routes: [FastPathRoute], preserveFlags: Bool = true,
                                        lahf: Bool = false, at origin: UInt64) throws(DMPRefusal) -> (bytes: [UInt8], body: FastPathBody) {
        var a = X86Assembler(origin: origin)
        let body = try emitBody(for: instruction, routes: routes, preserveFlags: preserveFlags, lahf: lahf, into: &a)
        try a.jmp(.absolute(instruction.nextAddress))
        return (try a.finish(), body)
    }

    /// Whether the arithmetic flags (CF, PF, AF, ZF, SF, OF) are dead at the start of `next`,
    /// the instruction that always follows the hot one: it writes all six (or leaves them
    /// undefined) and reads none. Then a body may skip `pushfq`/`popfq` (DESIGN.md step 4).
    package static func arithmeticFlagsDead(before next: X86Instruction) -> Bool {
        next.flagsWritten.isSuperset(of: .arithmetic) && next.flagsRead.isDisjoint(with: .arithmetic)
    }

    /// The bytes that replace a patched instruction of at least 5 bytes: `jmp rel32` to
    /// `target`, then NOPs to the instruction's end (DESIGN.md step 4).
    package static func siteJump(replacing instruction: X86Instruction, to target: UInt64) throws(DMPRefusal) -> [UInt8] {
        guard instruction.length >= 5 else {
            throw DMPRefusal(.plan, "\(instruction) is \(instruction.length) bytes; a jmp rel32 needs 5")
        }
        var a = X86Assembler(origin: instruction.address)
        try a.jmp(.absolute(target))
        a.nop(instruction.length - 5)
        return try a.finish()
    }
}

/// The access a qualifying instruction makes.
private enum AccessAddress {
    /// A port from `dx`.
    case portInDX
    /// A port or memory address known from the bytes alone (`imm8`, RIP-relative, absolute).
    case fixed(FastPathRoute.Target)
    /// A memory address computed from registers at run time.
    case dynamic(X86MemoryOperand, displacement: Int64)
}

/// How the instruction's value moves.
private enum AccessValue {
    /// A read into `destination` (`extension` for movzx/movsx).
    case read(destination: X86Register, extension: X86LoadExtension)
    /// A write of a register.
    case writeRegister(X86Register)
    /// A write of an immediate.
    case writeImmediate(UInt64)
}

/// One body's emission: the instruction's access, the checked routes and the registers chosen.
private struct BodyEmitter {
    let instruction: X86Instruction
    let routes: [FastPathRoute]
    let width: Int
    let direction: AccessDirection
    let address: AccessAddress
    let value: AccessValue
    let preserveFlags: Bool
    /// Flags saved by `lahf`/`seto al` into a stack word above the saved registers (instead of `pushfq`).
    let lahfFlags: Bool

    /// The runtime address register (dynamic memory operands).
    var addressRegister: X86Register?
    /// The ring value register (`value << 32`).
    var valueRegister: X86Register?
    /// General scratch registers (compare temps, ring and pending-check temps; the first may be `addressRegister`).
    var temps: [X86Register] = []
    /// The TSC counter's scratch register (never `rax` or `rdx`, which `rdtsc` and `mul` take).
    var counterRegister: X86Register?
    /// Every register pushed, in push order.
    var saved: [X86Register] = []

    init(instruction i: X86Instruction, routes: [FastPathRoute], preserveFlags: Bool, lahf: Bool) throws(DMPRefusal) {
        instruction = i
        self.routes = routes
        self.preserveFlags = preserveFlags
        guard i.mode == .bits64 else { throw DMPRefusal(.fastPath, "\(i): only 64-bit code gets fast paths") }
        guard !routes.isEmpty else { throw DMPRefusal(.fastPath, "\(i): no fast path to serve") }
        let shape: X86AccessShape
        switch i.accessShape {
        case .success(let s): shape = s
        case .failure(let r): throw DMPRefusal(.fastPath, "\(i): \(r)")
        }
        switch shape {
        case .portIn(let w, let dst, let inDX):
            width = w; direction = .read; value = .read(destination: dst, extension: .none)
            address = inDX ? .portInDX : .fixed(.port(try BodyEmitter.portImmediate(i)))
        case .portOut(let w, let src, let inDX):
            width = w; direction = .write; value = .writeRegister(src)
            address = inDX ? .portInDX : .fixed(.port(try BodyEmitter.portImmediate(i)))
        case .load(let w, let dst, let m, let ext):
            width = w; direction = .read; value = .read(destination: dst, extension: ext)
            address = BodyEmitter.memoryAddress(i, m)
        case .store(let w, let src, let m):
            width = w; direction = .write
            switch src {
            case .register(let r): value = .writeRegister(r)
            case .immediate(let v): value = .writeImmediate(UInt64(bitPattern: v))
            case .memory: throw DMPRefusal(.fastPath, "\(i): a memory-to-memory move")
            }
            address = BodyEmitter.memoryAddress(i, m)
        }
        var readsRAX = false
        if case .read(let dst, _) = value { readsRAX = dst.architectural == .rax }
        lahfFlags = preserveFlags && lahf && !readsRAX
        try checkRoutes()
        try chooseRegisters()
    }

    static func portImmediate(_ i: X86Instruction) throws(DMPRefusal) -> UInt16 {
        guard let f = i.encoding.immediate, f.size == 1, f.offset < i.bytes.count else {
            throw DMPRefusal(.fastPath, "\(i): no port immediate")
        }
        return UInt16(i.bytes[f.offset])
    }

    /// The memory operand's address: fixed when no register but RIP takes part.
    static func memoryAddress(_ i: X86Instruction, _ m: X86MemoryOperand) -> AccessAddress {
        // The displacement from VMMKit's tables, not Capstone's (DESIGN.md step 2).
        let disp = i.encoding.displacement?.signedValue(in: i.bytes) ?? m.displacement
        if m.isRIPRelative { return .fixed(.memory(i.nextAddress &+ UInt64(bitPattern: disp))) }
        if m.base == nil && m.index == nil { return .fixed(.memory(UInt64(bitPattern: disp))) }
        return .dynamic(m, displacement: disp)
    }

    // MARK: - Checks

    func checkRoutes() throws(DMPRefusal) {
        let i = instruction
        var targets: Set<FastPathRoute.Target> = []
        for r in routes {
            let what = "\(i): the route for \(describe(r.target))"
            guard r.direction == direction else { throw DMPRefusal(.fastPath, "\(what) is a \(r.direction) route for a \(direction)") }
            guard r.width == width else { throw DMPRefusal(.fastPath, "\(what) is \(r.width) bytes wide; the access is \(width)") }
            guard r.kind.servesReads == (direction == .read) else {
                throw DMPRefusal(.fastPath, "\(what): a \(r.kind.servesReads ? "read" : "write") fast path for a \(direction)")
            }
            switch (address, r.target) {
            case (.portInDX, .port), (.dynamic, .memory): break
            case (.fixed(let t), _) where t == r.target: break
            default: throw DMPRefusal(.fastPath, "\(what) never matches this instruction's operand")
            }
            guard targets.insert(r.target).inserted else { throw DMPRefusal(.fastPath, "\(what): two routes for one access") }
            switch r.kind {
            case .constantRead, .discardWrite: break
            case .sharedSlotRead:
                guard r.slot != nil else { throw DMPRefusal(.fastPath, "\(what): a shared-slot read without a slot address") }
            case .ringAppend:
                guard let ring = r.ring else { throw DMPRefusal(.fastPath, "\(what): a ring append without a ring") }
                guard width <= 4 else { throw DMPRefusal(.fastPath, "\(what): ring values are at most 32 bits") }
                try BodyEmitter.check(ring, what)
            case .tscCounter:
                if case .read(let dst, _) = value, dst.generalPurpose?.highByte == true {
                    throw DMPRefusal(.fastPath, "\(what): a TSC counter into a high-byte register")
                }
            }
            for ring in r.pendingRings { try BodyEmitter.check(ring, what) }
        }
    }

    static func check(_ ring: RingMapping, _ what: String) throws(DMPRefusal) {
        guard ring.slotCount >= 2, ring.slotCount & (ring.slotCount - 1) == 0, ring.slotCount <= 1 << 24 else {
            throw DMPRefusal(.fastPath, "\(what): ring slot count \(ring.slotCount) is not a power of two in 2...2^24")
        }
        guard ring.spinLimit > 0, ring.synchronousWaitLimit > 0 else {
            throw DMPRefusal(.fastPath, "\(what): ring loop bounds must be positive")
        }
    }

    func describe(_ t: FastPathRoute.Target) -> String {
        switch t {
        case .port(let p): "port 0x\(String(p, radix: 16))"
        case .memory(let a): "address 0x\(String(a, radix: 16))"
        }
    }

    /// Whether a route appends to a ring.
    var hasRing: Bool { routes.contains { if case .ringAppend = $0.kind { true } else { false } } }
    /// Whether a route reads a TSC-derived counter (`rdtsc` and `mul` clobber `rax` and `rdx`).
    var hasTSC: Bool { routes.contains { if case .tscCounter = $0.kind { true } else { false } } }

    /// Whether a ring's kick is a port (`out dx, al`: `rdx` pushed around it, `rax` saved as for every ring).
    var portKick: Bool {
        routes.contains { r in if case .port = r.ring?.kick { true } else { false } }
    }

    // MARK: - Registers

    /// Picks scratch registers the instruction does not name (`rax` excepted: saved and captured around).
    mutating func chooseRegisters() throws(DMPRefusal) {
        var named = Set((instruction.registersRead + instruction.registersWritten).map(\.architectural))
        if case .dynamic(let m, _) = address {
            for r in [m.base, m.index].compactMap({ $0 }) { named.insert(r.architectural) }
        }
        named.insert(.rsp)
        var pool: [X86Register] = [.rcx, .rdx, .rsi, .rdi, .r8, .r9, .r10, .r11, .rbx, .rbp, .r12, .r13, .r14, .r15]
            .filter { !named.contains($0) }
        func take(_ ok: (X86Register) -> Bool = { _ in true }) throws(DMPRefusal) -> X86Register {
            guard let k = pool.firstIndex(where: ok) else { throw DMPRefusal(.encode, "\(instruction): no scratch register left") }
            return pool.remove(at: k)
        }
        if hasRing {
            var highByteSource = false
            if case .writeRegister(let r) = value { highByteSource = r.generalPurpose?.highByte == true }
            valueRegister = try take { !highByteSource || ($0.generalPurpose?.number ?? 8) < 8 }
        }
        if case .dynamic = address { addressRegister = try take() }
        // Temps: the address register serves again once every route's address is compared;
        // a 64-bit address compare needs one more.
        var needed = hasRing ? 4 : routes.contains(where: { !$0.pendingRings.isEmpty }) ? 3 : 0
        if let ar = addressRegister {
            temps.append(ar)
            let wide = routes.contains { r in
                if case .memory(let t) = r.target { !X86Assembler.fitsInt32(Int64(bitPattern: t)) } else { false }
            }
            if wide { needed = max(needed, 2) }
        }
        while temps.count < needed { temps.append(try take()) }
        if hasTSC { counterRegister = try take { $0 != .rdx } }
        saved = [valueRegister].compactMap { $0 } + temps + [counterRegister].compactMap { $0 }
        if (hasRing || hasTSC || lahfFlags) && !saved.contains(.rax) { saved.append(.rax) }
        if hasTSC && !saved.contains(.rdx) { saved.append(.rdx) }
        guard stackBytes <= FastPathEmitter.stackLimit else {
            throw DMPRefusal(.encode, "\(instruction): the body would need \(stackBytes) bytes of stack")
        }
    }

    /// The stack the body pushes below the red zone: the saved registers, unless skipped the flags,
    /// and `rdx` around a port kick.
    var stackBytes: Int { 8 * (saved.count + (preserveFlags ? 1 : 0) + (portKick ? 1 : 0)) }

    /// The scratch register for a 64-bit address compare (never the address register).
    var compareTemp: X86Register { temps.first { $0 != addressRegister } ?? temps[0] }

    // MARK: - Emission

    mutating func emit(into a: inout X86Assembler) throws(DMPRefusal) -> FastPathBody {
        let start = a.position
        let fallback = a.newLabel(), done = a.newLabel(), end = a.newLabel()
        if stackBytes > 0 { try a.lea(.rsp, .init(base: .rsp, displacement: -FastPathEmitter.redZone)) }
        if preserveFlags && !lahfFlags { a.pushfq() }
        for r in saved { try a.push(r) }
        // How far RSP has moved so far (the lahf flags word is pushed after the address is taken).
        let depth = (stackBytes > 0 ? FastPathEmitter.redZone : 0) + Int64(8 * (saved.count + (preserveFlags && !lahfFlags ? 1 : 0)))
        if case .dynamic(let m, let disp) = address, let ar = addressRegister {
            let base = m.base?.architectural
            let adjusted = disp + (base == .rsp ? depth : 0)
            try a.lea(ar, .init(base: base, index: m.index?.architectural, scale: m.scale, displacement: adjusted))
        }
        if hasRing, let v = valueRegister { try captureValue(v, into: &a) }    // before lahf takes ah
        if lahfFlags {
            a.lahf()                                                             // SF ZF AF PF CF in ah
            a.setoAL()                                                           // OF in al
            try a.push(.rax)
        }
        if hasRing, let v = valueRegister, case .writeRegister = value { try a.shl(v, 32) }
        for r in routes {
            let next = a.newLabel()
            try matchTarget(r.target, otherwise: next, &a)
            try a.cmp(.at(r.enableWord), width: 4, immediate: 0)
            try a.jcc(.e, .label(fallback))
            for ring in r.pendingRings { try ringsEmpty(ring, otherwise: fallback, &a) }
            try serve(r, fallback: fallback, &a)
            if r.lockedCounters { try a.lockInc(.at(r.hitCounter), width: 8) } else { try a.inc(.at(r.hitCounter), width: 8) }
            try a.jmp(.label(done))
            try a.bind(next)
        }
        try a.bind(fallback)
        try restore(&a)
        let fallbackStart = a.position
        try a.relocate(instruction)
        let fallbackEnd = a.position
        try a.jmp(.label(end))
        try a.bind(done)
        try restore(&a)
        try a.bind(end)
        return FastPathBody(range: start..<a.position, fallback: fallbackStart..<fallbackEnd, stackBytes: stackBytes)
    }

    func restore(_ a: inout X86Assembler) throws(DMPRefusal) {
        if lahfFlags {
            try a.pop(.rax)
            a.addAL(0x7f)                                                        // OF = (al == 1)
            a.sahf()                                                             // SF ZF AF PF CF
        }
        for r in saved.reversed() { try a.pop(r) }
        if preserveFlags && !lahfFlags { a.popfq() }
        if stackBytes > 0 { try a.lea(.rsp, .init(base: .rsp, displacement: FastPathEmitter.redZone)) }
    }

    /// `V = value << 32`, zero-extended from the access width: the move here (no flag changes),
    /// the shift for a register value after the flags are saved (``emit(into:)``).
    func captureValue(_ v: X86Register, into a: inout X86Assembler) throws(DMPRefusal) {
        let v32 = X86Register.gpr32[v.generalPurpose?.number ?? 0]
        switch value {
        case .writeRegister(let src):
            switch width {
            case 4: try a.mov(v32, src)
            default: try a.movzx(v32, src)
            }
        case .writeImmediate(let imm):
            let mask: UInt64 = width == 4 ? 0xffff_ffff : (1 << UInt64(8 * width)) - 1
            try a.mov(v, immediate: (imm & mask) << 32)
        case .read:
            break
        }
    }

    /// Compares the runtime port or address with the route's; fixed ones were checked when the routes were.
    func matchTarget(_ t: FastPathRoute.Target, otherwise next: X86Assembler.Label, _ a: inout X86Assembler) throws(DMPRefusal) {
        switch (address, t) {
        case (.portInDX, .port(let p)):
            try a.cmp(.dx, immediate: Int64(p))
            try a.jcc(.ne, .label(next))
        case (.dynamic, .memory(let target)):
            guard let ar = addressRegister else { return }
            let signed = Int64(bitPattern: target)
            if signed >= Int64(Int32.min) && signed <= Int64(Int32.max) {
                try a.cmp(ar, immediate: signed)
            } else {
                try a.mov(compareTemp, immediate: target)
                try a.cmp(ar, compareTemp)
            }
            try a.jcc(.ne, .label(next))
        default:
            break
        }
    }

    /// Goes to `fallback` unless `ring` is empty: its hint equals its consumer index and the slot there is not published.
    func ringsEmpty(_ ring: RingMapping, otherwise fallback: X86Assembler.Label, _ a: inout X86Assembler) throws(DMPRefusal) {
        let (c, idx, word) = (temps[0], temps[1], temps[2])
        let idx32 = X86Register.gpr32[idx.generalPurpose?.number ?? 0], c32 = X86Register.gpr32[c.generalPurpose?.number ?? 0]
        let word32 = X86Register.gpr32[word.generalPurpose?.number ?? 0]
        try a.mov(c, .at(ring.base &+ PVRingLayout.consumerOffset))
        try a.arithmetic(.cmp, c, .at(ring.base &+ PVRingLayout.hintOffset))
        try a.jcc(.ne, .label(fallback))
        try a.mov(idx32, c32)
        try a.and(idx32, immediate: Int64(ring.slotCount - 1))
        try a.lea(word, .at(ring.base &+ PVRingLayout.slotsOffset))
        try a.mov(word, .init(base: word, index: idx, scale: 8))
        try a.lea(idx32, .init(base: c, displacement: 1))
        try a.cmp(word32, idx32)
        try a.jcc(.e, .label(fallback))
    }

    func serve(_ r: FastPathRoute, fallback: X86Assembler.Label, _ a: inout X86Assembler) throws(DMPRefusal) {
        switch r.kind {
        case .constantRead(let v):
            guard case .read(let dst, let ext) = value else { return }
            try a.mov(dst, immediate: extended(v, ext, into: dst))
        case .sharedSlotRead:
            guard case .read(let dst, let ext) = value, let slot = r.slot else { return }
            switch ext {
            case .none: try a.mov(dst, .at(slot))
            case .zero: try a.movzx(dst, .at(slot), width: width)
            case .sign: try a.movsx(dst, .at(slot), width: width)
            }
        case .discardWrite:
            break
        case .ringAppend:
            guard let ring = r.ring else { return }
            try ringAppend(ring, locked: r.lockedCounters, fallback: fallback, &a)
        case .tscCounter(let counter):
            try tscCounter(counter, &a)
        }
    }

    /// `rdtsc`, then `((tsc × multiplier) >> shift) + offset) & wrapMask` at 128 bits
    /// (``TSCCounter/value(tsc:)``), into the destination with the load's width semantics.
    /// At CPL3 `rdtsc` faults when the guest set CR4.TSD: the planner must check it.
    func tscCounter(_ c: TSCCounter, _ a: inout X86Assembler) throws(DMPRefusal) {
        guard let r = counterRegister else { return }
        a.rdtsc()
        try a.shl(.rdx, 32)
        try a.or(.rax, .rdx)                                         // rax = tsc
        try a.mov(r, immediate: c.multiplier)
        try a.mul(r)                                                 // rdx:rax = tsc × multiplier
        let shift = min(c.shift, 127)
        if shift >= 64 {
            try a.mov(.rax, .rdx)
            if shift > 64 { try a.shr(.rax, shift - 64) }
        } else if shift > 0 {
            try a.shrd(.rax, .rdx, shift)
        }
        if c.offset != 0 {
            try a.mov(r, immediate: c.offset)
            try a.add(.rax, r)
        }
        if c.wrapMask != .max {
            try a.mov(r, immediate: c.wrapMask)
            try a.arithmetic(.and, .rax, r)
        }
        try a.mov(r, .rax)
        try writeDestination(from: r, &a)
    }

    /// The read's destination from `r` (which holds the value in its low access-width bytes), with the
    /// load's extension and the destination's write semantics (8/16 bits keep the rest, 32 clear it).
    /// A destination the body saved (`rax`, `rdx`) is written in its stack slot, so the restore loads it.
    func writeDestination(from r: X86Register, _ a: inout X86Assembler) throws(DMPRefusal) {
        guard case .read(let dst, let ext) = value, let n = r.generalPurpose?.number, let dw = dst.generalPurpose?.width else { return }
        func alias(_ w: Int) -> X86Register {
            switch w { case 1: X86Register.gpr8[n]; case 2: X86Register.gpr16[n]; case 4: X86Register.gpr32[n]; default: r }
        }
        switch (ext, width) {
        case (.zero, 1), (.zero, 2): try a.movzx(alias(4), alias(width))
        case (.sign, 1), (.sign, 2), (.sign, 4): try a.movsx(r, alias(width))
        default: break
        }
        guard let k = saved.firstIndex(of: dst.architectural) else {
            try a.mov(dst, alias(dw))
            return
        }
        let slot = X86Assembler.Memory(base: .rsp, displacement: Int64(8 * (saved.count - 1 - k + (lahfFlags ? 1 : 0))))
        try a.mov(slot, alias(dw))
        if dw == 4 {                                                 // a 32-bit write clears bits 63:32
            var upper = slot
            upper.displacement += 4
            try a.mov(upper, width: 4, immediate: 0)
        }
    }

    /// A constant read's value as the destination receives it (zero- or sign-extended from the access width).
    func extended(_ v: UInt64, _ ext: X86LoadExtension, into dst: X86Register) -> UInt64 {
        let bits = UInt64(8 * width)
        let masked = bits >= 64 ? v : v & ((1 << bits) - 1)
        guard ext == .sign, bits < 64 else { return masked }
        let shift = 64 - bits
        return UInt64(bitPattern: Int64(bitPattern: masked << shift) >> Int64(shift))
    }

    /// The ring v2 producer (PVRingLayout, Guests/include/ring.inc): hint, one 8-byte
    /// `lock cmpxchg` claims and publishes, help move the hint, bounded loops; a
    /// synchronous append waits, bounded, for the consumer index to pass its entry, and adds the
    /// iterations it waited to the ring's wait counter (``RingMapping/waitCounter``), if it has one.
    func ringAppend(_ ring: RingMapping, locked: Bool, fallback: X86Assembler.Label, _ a: inout X86Assembler) throws(DMPRefusal) {
        guard let v = valueRegister else { return }
        let t = temps
        let (slot, new, p, n) = (t[0], t[1], t[2], t[3])
        func r32(_ r: X86Register) -> X86Register { X86Register.gpr32[r.generalPurpose?.number ?? 0] }
        let hint = X86Assembler.Memory.at(ring.base &+ PVRingLayout.hintOffset)
        let flags = X86Assembler.Memory.at(ring.base &+ PVRingLayout.flagsOffset)
        let count = Int64(ring.slotCount)
        let claim = a.newLabel(), other = a.newLabel(), help = a.newLabel(), retry = a.newLabel(), served = a.newLabel()
        if ring.synchronous {
            // A synchronous producer appends only while a consumer polls.
            try a.test(flags, width: 4, immediate: Int64(PVRingLayout.pollingFlag))
            try a.jcc(.e, .label(fallback))
        }
        // The polling consumer sleeps: the original access instead. Its exit applies the ring's
        // entries first and wakes the poller (a write to a ring's target register does); then
        // the appends that follow find it polling. (A poller that falls asleep after this look
        // is kicked after publishing, below, where the body has a kick register.)
        try a.test(flags, width: 4, immediate: Int64(PVRingLayout.wakeFlag))
        try a.jcc(.ne, .label(fallback))
        try a.mov(r32(n), immediate: UInt64(ring.spinLimit))
        try a.bind(claim)
        try a.mov(p, hint)                                           // p = hint
        try a.mov(r32(slot), r32(p))
        try a.and(r32(slot), immediate: count - 1)
        try a.lea(new, .at(ring.base &+ PVRingLayout.slotsOffset))
        try a.lea(slot, .init(base: new, index: slot, scale: 8))     // the slot of p
        try a.mov(.rax, .init(base: slot))                           // its word, one load
        try a.cmp(.eax, r32(p))
        try a.jcc(.ne, .label(other))
        try a.lea(r32(new), .init(base: p, displacement: 1))         // free: (p + 1, value)
        try a.or(new, v)
        try a.lockCmpxchg(.init(base: slot), new)                    // claims and publishes
        try a.jcc(.ne, .label(retry))
        try a.mov(.rax, p)                                           // move the hint p -> p + 1
        try a.lea(new, .init(base: p, displacement: 1))
        try a.lockCmpxchg(hint, new)
        let kick = a.newLabel()
        if ring.kick != nil {
            // The polling consumer sleeps: kick it (the line is the hint's, just written: a cheap look).
            try a.test(flags, width: 4, immediate: Int64(PVRingLayout.wakeFlag))
            try a.jcc(.ne, .label(kick))
        }
        if ring.synchronous {
            let wait = a.newLabel()
            try a.mov(r32(n), immediate: UInt64(ring.synchronousWaitLimit))
            let waited = a.newLabel()
            try a.bind(wait)
            try a.mov(.rax, .at(ring.base &+ PVRingLayout.consumerOffset))
            try a.sub(.rax, p)                                       // consumer - p > 0: applied
            try a.jcc(.g, .label(ring.waitCounter == nil ? served : waited))
            a.pause()
            try a.dec(r32(n))
            try a.jcc(.ne, .label(wait))                             // waited long enough: kick
            if let counter = ring.waitCounter {
                try a.bind(waited)                                   // the iterations waited, for verification
                try a.mov(.eax, immediate: UInt64(ring.synchronousWaitLimit))
                try a.sub(.eax, r32(n))
                if locked { try a.lockAdd(.at(counter), .rax) } else { try a.arithmetic(.add, .at(counter), .rax) }
                try a.test(r32(n), r32(n))                           // n > 0: applied in time
                try a.jcc(.ne, .label(served))
            }
        }
        if let k = ring.kick {
            if !ring.synchronous { try a.jmp(.label(served)) }
            try a.bind(kick)
            switch k {                                               // an exit: the VMM drains, then wakes the poller
            case .port(let port):
                try a.push(.rdx)                                     // counted in stackBytes
                try a.mov(.edx, immediate: UInt64(port))
                try a.outDX(width: 1)
                try a.pop(.rdx)
            case .memory(let address):
                try a.mov(.at(address), width: 4, immediate: 1)
            }
        }
        try a.jmp(.label(served))
        try a.bind(other)
        try a.lea(r32(new), .init(base: p, displacement: 1))
        try a.cmp(.eax, r32(new))                                    // published by another producer
        try a.jcc(.e, .label(help))
        try a.lea(r32(new), .init(base: p, displacement: count))
        try a.cmp(.eax, r32(new))                                    // already consumed: the hint is stale
        try a.jcc(.e, .label(help))
        try a.lea(r32(new), .init(base: p, displacement: 1 - count))
        try a.cmp(.eax, r32(new))                                    // the last lap's entry: full
        try a.jcc(.ne, .label(retry))                                // anything else: read the hint again
        try a.test(flags, width: 4, immediate: Int64(PVRingLayout.pollingFlag))
        try a.jcc(.e, .label(fallback))                              // full, nobody polling: exit instead
        a.pause()                                                    // full, a consumer polls: wait a bit
        try a.jmp(.label(retry))
        try a.bind(help)                                             // help move the hint p -> p + 1
        try a.mov(.rax, p)
        try a.lea(new, .init(base: p, displacement: 1))
        try a.lockCmpxchg(hint, new)
        try a.bind(retry)
        try a.dec(r32(n))
        try a.jcc(.ne, .label(claim))
        try a.jmp(.label(fallback))                                  // the bound ran out
        try a.bind(served)
    }
}

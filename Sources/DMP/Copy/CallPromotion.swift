import VMMKit
import X86Disassembler

/// An indirect call of a copied function promoted to direct calls of accessor copies
/// (DESIGN.md, DMP step 4: the copy of a function reached only through pointers is
/// entered from a copy of its caller).
///
/// A tiny out-of-line accessor (`mov edx, edi; mov eax, esi; out dx, al; ret`) called only
/// through a function pointer has no way in of its own: no 5-byte instruction, no direct
/// `call rel32`, no dead padding in reach. Its caller's copy holds, in place of the
/// indirect call, a compare of the runtime target with each accessor's address: equal,
/// it calls that accessor's copy (placed after the caller's copy, hot instructions
/// rewritten inline); otherwise it makes the original call. No running byte changes but
/// the caller's entries, each one instruction, as for any function copy.
package struct CallPromotion: Hashable, Sendable {
    /// Where the call's target comes from, evaluated with the registers and RSP of the call instruction.
    package enum Target: Hashable, Sendable {
        /// `call r64`.
        case register(X86Register)
        /// `call [m]` (a RIP-relative operand as its absolute address).
        case memory(X86Assembler.Memory)
    }

    /// The call instruction's address in the copied function (an indirect `call`, or a direct `call rel32`
    /// of a one-instruction thunk `jmp r/m64`, of a register thunk or of a load thunk).
    package var site: UInt64
    /// The target the call reaches.
    package var target: Target
    /// The accessors' entry addresses, compared in this order (at most ``maximumAccessors``).
    package var accessors: [UInt64]
    /// For a direct call of a thunk: the bytes of the thunks it runs, the called one first (a load thunk's
    /// register thunk second). Their pages are guarded and their bytes checked at the write.
    package var thunks: [CodeImage.Region]
    /// For a call of a load thunk (`mov r64, [m]`, then a jump through `r64`): `r64`, which the thunk leaves
    /// holding the target; a promoted call that calls an accessor's copy directly sets it to the accessor's address.
    package var loads: X86Register?

    /// The called thunk's bytes (the first of ``thunks``), for a direct call of a thunk.
    package var thunk: CodeImage.Region? { thunks.first }

    /// Accessors one call compares at most (the short jumps of the compare chain must reach their calls).
    package static let maximumAccessors = 4

    /// Creates a promotion.
    package init(site: UInt64, target: Target, accessors: [UInt64], thunks: [CodeImage.Region] = [], loads: X86Register? = nil) {
        self.site = site; self.target = target; self.accessors = accessors; self.thunks = thunks; self.loads = loads
    }

    /// The promotion of `call`, an instruction of `caller`, for `accessor`: `call` is `call r64` or
    /// `call [m]` (FF /2), or a direct `call rel32` of a sized function that is one indirect `jmp`
    /// (after an optional `endbr64`), whose operand is then evaluated at the call site. Retpoline code calls
    /// through thunks (``BranchThunk``): a direct `call` of a register thunk is `call r64`, and a direct `call`
    /// of a *load thunk*, `mov r64, [m]` then `jmp r64` or a `jmp` to a register thunk of `r64` (gcc -Os's
    /// `serial_out` with retpolines), is `call [m]` that also leaves the target in `r64` (``loads``).
    /// Refuses other instructions, `fs`/`gs` or `67`-prefixed operands, `rsp` as the target register,
    /// a thunk whose operand is RIP-relative beyond reach or that does more than jump.
    package static func make(call: X86Instruction, caller: DecodedFunction, accessor: UInt64, in image: CodeImage,
                             disassembler: X86Disassembler) throws(DMPRefusal) -> CallPromotion {
        let at = caller.location(call.address)
        let e = call.encoding
        if e.map == .primary, e.opcode == 0xff, (e.modRM >> 3) & 7 == 2 {
            return CallPromotion(site: call.address, target: try target(of: call, at: at, stackOffset: 0), accessors: [accessor])
        }
        guard e.map == .primary, e.opcode == 0xe8, call.length == 5, let b = call.branch else {
            throw DMPRefusal(.plan, "the instruction before the return address (\(call) at \(at)) is not an indirect call")
        }
        guard b.target != accessor else {
            throw DMPRefusal(.plan, "\(call) at \(at) calls the accessor directly (a retargeted call site serves it)")
        }
        if let via = BranchThunk.registerThunk(reachedBy: call, in: image, disassembler: disassembler) {
            return CallPromotion(site: call.address, target: .register(via.register), accessors: [accessor], thunks: [via.thunk])
        }
        guard let symbol = image.function(containing: b.target), symbol.address == b.target else {
            throw DMPRefusal(.plan, "\(call) at \(at) calls 0x\(String(b.target, radix: 16)), which starts no sized function")
        }
        let thunk = try image.decode(symbol, disassembler: disassembler)
        let region = CodeImage.Region(address: thunk.start, bytes: thunk.bytes)
        let body = thunk.instructions.first?.bytes == [0xf3, 0x0f, 0x1e, 0xfa] ? Array(thunk.instructions.dropFirst()) : thunk.instructions
        let named = "\(symbol.name) (called at \(at))"
        if body.count == 2, let load = loadedRegister(body[0]) {
            let jump = body[1]
            var through: [CodeImage.Region] = []
            if let via = BranchThunk.registerThunk(reachedBy: jump, in: image, disassembler: disassembler), via.register == load,
               jump.encoding.opcode == 0xe9 {
                through = [via.thunk]
            } else if !(isIndirectJump(jump) && jump.operands.first?.operand == .register(load)) {
                throw DMPRefusal(.plan, "\(call) at \(at) calls \(symbol.name), which loads \(load) but does not jump through it")
            }
            // In the thunk RSP is 8 lower than at the call (the return address): [rsp + d] there is [rsp + d - 8] here.
            return CallPromotion(site: call.address, target: try target(of: body[0], operand: 1, at: named, stackOffset: -8),
                                 accessors: [accessor], thunks: [region] + through, loads: load)
        }
        guard body.count == 1, let jump = body.first, jump.encoding.map == .primary, jump.encoding.opcode == 0xff,
              (jump.encoding.modRM >> 3) & 7 == 4 else {
            throw DMPRefusal(.plan, "\(call) at \(at) calls \(symbol.name), which is not a one-jump thunk (jmp r/m64), "
                             + "a register thunk or a load thunk (mov r64, [m]; jmp through r64)")
        }
        return CallPromotion(site: call.address, target: try target(of: jump, at: named, stackOffset: -8),
                             accessors: [accessor], thunks: [region])
    }

    /// For `mov r64, [m]` (8B /r, a 64-bit register other than RSP loaded from a 64-bit memory operand): `r64`.
    private static func loadedRegister(_ i: X86Instruction) -> X86Register? {
        guard i.encoding.map == .primary, i.encoding.opcode == 0x8b, i.operands.count == 2, i.operands[1].memory != nil,
              i.operands[1].size == 8, case .register(let r) = i.operands[0].operand, let g = r.generalPurpose, g.width == 8,
              r != .rsp else { return nil }
        return r
    }

    /// The promotions, for the same accessors, of the other calls of `caller` through the same pointer as this one
    /// (the same target operand, through the same thunk if any): a function that calls one function pointer from
    /// several places (`serial_out(port, UART_IER, 0)` ... `serial_out(port, UART_IER, ier)`) reaches the accessor
    /// from each. The operand may hold another value at another call (a register, a stack slot): each promoted call
    /// compares at run time, so a call that reaches something else only makes its original call.
    package func samePointerCalls(in caller: DecodedFunction, image: CodeImage, disassembler: X86Disassembler) -> [CallPromotion] {
        // A guarded tail jump names no pointer a call shares: its other tail jumps are found by ``tailJumps(in:to:image:disassembler:)``.
        guard let k = caller.index(at: site), caller.instructions[k].groups.contains(.call) else { return [] }
        return caller.instructions.compactMap { i -> CallPromotion? in
            guard i.address != site, i.groups.contains(.call),
                  var p = try? CallPromotion.make(call: i, caller: caller, accessor: accessors.first ?? 0, in: image, disassembler: disassembler),
                  p.target == target, p.thunks.map(\.address) == thunks.map(\.address) else { return nil }
            p.accessors = accessors
            return p
        }
    }

    /// Whether `i` is an indirect near `jmp` (FF /4: `jmp r64`, `jmp [m]`).
    package static func isIndirectJump(_ i: X86Instruction) -> Bool {
        i.encoding.map == .primary && i.encoding.opcode == 0xff && (i.encoding.modRM >> 3) & 7 == 4
    }

    /// Whether `i` is a direct `jmp rel32` (E9), what an indirect jump becomes in retpoline code (to a register thunk).
    package static func isDirectJump32(_ i: X86Instruction) -> Bool {
        i.encoding.map == .primary && i.encoding.opcode == 0xe9 && i.length == 5
    }

    /// The indirect tail jumps of `function` promoted for `accessor`: each indirect `jmp` (FF /4, register or memory
    /// operand) reached with nothing pushed (``DecodedFunction/stackDepth(at:)`` is 0: after the epilogue, so the
    /// target runs with the caller's return address on top, as if called), that is not the dispatch of a jump table
    /// the copy keeps (``JumpTable/find(in:image:)``) and whose operand qualifies (no `fs`/`gs` or `67` prefix, not
    /// `rsp`). A function called directly that reaches the accessor only through such a jump (`ops->write(c, s, n)` as
    /// a function's last statement, gcc's sibling call) leaves no frame of its own on the stack at the accessor's exit:
    /// the return address there leads to the `call` of this function, not of the accessor.
    /// In retpoline code the indirect tail jump is a `jmp rel32` to a register thunk (``BranchThunk``), promoted as
    /// `jmp r64` (the thunk's bytes guarded like a called thunk's).
    package static func tailJumps(in function: DecodedFunction, to accessor: UInt64, image: CodeImage,
                                  disassembler: X86Disassembler) -> [CallPromotion] {
        let tables = Set(JumpTable.find(in: function, image: image).map(\.jump))
        return function.instructions.compactMap { i -> CallPromotion? in
            guard isIndirectJump(i) || isDirectJump32(i), !tables.contains(i.address), (try? function.stackDepth(at: i.address)) == 0 else {
                return nil
            }
            if isDirectJump32(i) {
                guard let via = BranchThunk.registerThunk(reachedBy: i, in: image, disassembler: disassembler) else { return nil }
                return CallPromotion(site: i.address, target: .register(via.register), accessors: [accessor], thunks: [via.thunk])
            }
            guard let t = try? target(of: i, at: function.location(i.address), stackOffset: 0) else { return nil }
            return CallPromotion(site: i.address, target: t, accessors: [accessor])
        }
    }

    /// For `call`, a direct `call rel32` of a sized function F other than `target` (the function whose return address
    /// leads to `call`: F reached it by a tail jump, leaving no frame of its own), F decoded and its indirect tail jumps
    /// with nothing pushed promoted for `target` (``tailJumps(in:to:image:disassembler:)``, possibly none); `nil` when
    /// `call` is no such call (also a call of a register thunk).
    package static func tailJumpingCallee(of call: X86Instruction, to target: UInt64, in image: CodeImage,
                                          disassembler: X86Disassembler) throws(DMPRefusal) -> (function: DecodedFunction, jumps: [CallPromotion])? {
        guard call.encoding.map == .primary, call.encoding.opcode == 0xe8, let b = call.branch, b.target != target,
              let f = image.function(containing: b.target), f.address == b.target else { return nil }
        let function = try image.decode(f, disassembler: disassembler)
        // A register thunk (retpolines) is no function called directly: its call is the indirect call `call r64`
        // (``make(call:caller:accessor:in:disassembler:)``).
        if BranchThunk.registerThunk(reachedBy: call, in: image, disassembler: disassembler) != nil { return nil }
        return (function, tailJumps(in: function, to: target, image: image, disassembler: disassembler))
    }

    /// The target operand of the indirect branch `i`, as seen `stackOffset` bytes of RSP away from `i` (RSP-based
    /// displacements move by it).
    /// `operand`: which of `i`'s operands (by default its only one).
    private static func target(of i: X86Instruction, operand: Int? = nil, at: String, stackOffset: Int64) throws(DMPRefusal) -> Target {
        let e = i.encoding
        guard !e.hasAddressSizePrefix, e.segmentOverride.map({ $0 != 0x64 && $0 != 0x65 }) ?? true else {
            throw DMPRefusal(.plan, "\(i) at \(at): fs/gs or 67-prefixed operand")
        }
        guard operand != nil || i.operands.count == 1, let op = i.operands.indices.contains(operand ?? 0) ? i.operands[operand ?? 0] : nil else {
            throw DMPRefusal(.plan, "\(i) at \(at) has no single operand")
        }
        switch op.operand {
        case .register(let r):
            guard let g = r.generalPurpose, g.width == 8, r != .rsp else { throw DMPRefusal(.plan, "\(i) at \(at): target register \(r)") }
            return .register(r)
        case .memory(let m):
            guard op.size == 8, m.segment == nil || m.segment == .ds || m.segment == .ss || m.segment == .cs || m.segment == .es else {
                throw DMPRefusal(.plan, "\(i) at \(at): not a 64-bit memory operand of the flat segments")
            }
            if m.isRIPRelative {
                guard m.base == .rip, m.index == nil else { throw DMPRefusal(.plan, "\(i) at \(at): eip-relative operand") }
                return .memory(.at(i.nextAddress &+ UInt64(bitPattern: m.displacement)))
            }
            let stack = m.base == .rsp ? stackOffset : 0
            return .memory(X86Assembler.Memory(base: m.base, index: m.index, scale: m.scale, displacement: m.displacement &+ stack))
        case .immediate:
            throw DMPRefusal(.plan, "\(i) at \(at) has an immediate target")
        }
    }

    /// Emits the promoted call in place of `call` (the original instruction, re-encoded for the miss path),
    /// `entries[k]` being where the copy of `accessors[k]` starts:
    ///
    /// ```
    ///         push rcx
    ///         mov  rcx, <target>            ; an RSP-based operand 8 further: RSP moved by the push
    ///         lea  rcx, [rcx - A0]          ; zero when the target is A0 (lea and jrcxz touch no flag)
    ///         jrcxz hit0
    ///         lea  rcx, [rcx - (A1 - A0)]
    ///         jrcxz hit1
    ///         pop  rcx
    ///         <the original call>           ; any other target: the call as it was (its operand read again)
    ///         jmp  done
    /// hit0:   pop  rcx
    ///         call <copy of A0>
    ///         jmp  done
    /// hit1:   pop  rcx
    ///         call <copy of A1>
    /// done:
    /// ```
    ///
    /// Every register and flag is as the original call leaves them: RCX is restored before either call, and the
    /// calls run with the original RSP (stack arguments and the callee's frame where they were). The push uses the
    /// 8 bytes below RSP: at a call instruction nothing below RSP is live, because the call itself writes its
    /// return address there and the callee owns everything below it (the red zone's contents do not survive a
    /// call), and the saved RCX stays above RSP while it is needed, so an interrupt taken on this stack at CPL0
    /// cannot overwrite it. On the miss path the target is read twice, once for the compare and once by the
    /// original call: both reads are the guest's own operand, and the second decides, as if the call had run then.
    ///
    /// A promoted indirect tail jump (`call` is a `jmp r/m64`, or a `jmp rel32` to a register thunk,
    /// ``tailJumps(in:to:image:disassembler:)``) is a guarded dispatch:
    ///
    /// ```
    ///         lea  rsp, [rsp - 128]         ; below the red zone first, as stubs do
    ///         push rcx
    ///         mov  rcx, <target>            ; an RSP-based operand 136 further
    ///         lea  rcx, [rcx - A0]
    ///         jrcxz hit0
    ///         ...
    ///         pop  rcx
    ///         lea  rsp, [rsp + 128]
    ///         <the original jmp>            ; any other target: lands in the intact original (its operand read again)
    /// hit0:   pop  rcx
    ///         lea  rsp, [rsp + 128]
    ///         jmp  <copy of A0>
    /// ```
    ///
    /// A jump, unlike a call, may leave something live below RSP (the red zone at CPL3), so the saved RCX goes 128
    /// bytes further down. No instruction of either form writes a flag (`push`, `pop`, `mov`, `lea` and `jrcxz` do
    /// not), so the flags the original left reach the target on every path without a `pushfq`; every register is
    /// as the original left it, and RSP is the original's when either jump runs.
    package static func emit(_ promotion: CallPromotion, call: X86Instruction, entries: [X86Assembler.Target],
                             into a: inout X86Assembler) throws(DMPRefusal) {
        guard !promotion.accessors.isEmpty, promotion.accessors.count == entries.count,
              promotion.accessors.count <= maximumAccessors else {
            throw DMPRefusal(.encode, "a promoted call compares 1 to \(maximumAccessors) accessors (\(promotion.accessors.count) given)")
        }
        let jump = isIndirectJump(call) || isDirectJump32(call)
        let below: Int64 = jump ? FastPathEmitter.redZone : 0
        if jump { try a.lea(.rsp, X86Assembler.Memory(base: .rsp, displacement: -below)) }
        try a.push(.rcx)
        switch promotion.target {
        case .register(let r):
            if r != .rcx { try a.mov(.rcx, r) }
        case .memory(var m):
            if m.base == .rsp { m.displacement &+= 8 &+ below }
            try a.mov(.rcx, m)
        }
        var previous: UInt64 = 0
        var hits: [X86Assembler.Label] = []
        for accessor in promotion.accessors {
            let delta = Int64(bitPattern: previous &- accessor)
            guard X86Assembler.fitsInt32(delta) else {
                throw DMPRefusal(.encode, "accessor 0x\(String(accessor, radix: 16)) is beyond a 32-bit displacement of the compare")
            }
            try a.lea(.rcx, X86Assembler.Memory(base: .rcx, displacement: delta))
            let hit = a.newLabel()
            try a.jrcxz(hit)
            hits.append(hit)
            previous = accessor
        }
        let done = jump ? nil : a.newLabel()
        try a.pop(.rcx)
        if jump { try a.lea(.rsp, X86Assembler.Memory(base: .rsp, displacement: below)) }
        try a.relocate(call)
        if let done { try a.jmp(.label(done)) }
        for (k, hit) in hits.enumerated() {
            try a.bind(hit)
            try a.pop(.rcx)
            // A load thunk leaves the target in its register: on a hit, that is the accessor's address.
            if let r = promotion.loads { try a.mov(r, immediate: promotion.accessors[k]) }
            if jump {
                try a.lea(.rsp, X86Assembler.Memory(base: .rsp, displacement: below))
                try a.jmp(entries[k])
            } else {
                try a.call(entries[k])
                if let done, k + 1 < hits.count { try a.jmp(.label(done)) }
            }
        }
        if let done { try a.bind(done) }
    }
}

extension DecodedFunction {
    /// How many bytes the function's code has pushed on the stack when it reaches the instruction at `address`:
    /// `push`/`pop` (8 bytes each), `sub`/`add rsp, imm`, `lea rsp, [rsp + d]`, followed from the start through the
    /// function's branches (fall-through, direct jumps and conditional branches inside it; calls, direct or
    /// indirect, return with RSP as it was; returns, indirect jumps and jumps out of the function end a path).
    /// Refuses when the paths reaching `address` disagree (a push skipped by a branch), when one of them changes
    /// RSP any other way (`mov rsp`, `leave`, `enter`, `and rsp`, 16-bit pushes) or none reaches it.
    /// The depth only chooses which caller a promotion looks at (the return address read there is checked, and
    /// the promoted call compares its target at run time): a wrong one can cost the patch, never correctness.
    package func stackDepth(at address: UInt64) throws(DMPRefusal) -> UInt64 {
        guard let target = index(at: address) else { throw DMPRefusal(.plan, "0x\(String(address, radix: 16)) is no instruction start of \(symbol.name)") }
        /// Depth on entry to each instruction reached: a number of bytes, or nil once an untracked change reached it.
        var depths: [Int: Int64?] = [0: 0]
        var untracked: [Int: DMPRefusal] = [:]
        var work = [0]
        var steps = 0
        while let k = work.popLast() {
            steps += 1
            guard steps <= 4 * instructions.count + 4, let entry = depths[k] else { break }
            let i = instructions[k]
            let g = i.groups
            var after = entry
            if let d = entry, i.registersWritten.contains(.rsp), !g.contains(.call), !g.contains(.return) {
                let unknown = DMPRefusal(.plan, "\(i) at \(location(i.address)) changes rsp in a way not tracked")
                let ops = i.operands.map(\.operand)
                var next: Int64?
                if !i.encoding.hasOperandSizePrefix {
                    switch i.mnemonic {
                    case "push", "pushfq": next = d + 8
                    case "pop", "popfq": next = ops.first == .register(.rsp) ? nil : d - 8
                    case "sub", "add":
                        if ops.count == 2, ops[0] == .register(.rsp), case .immediate(let v) = ops[1] { next = i.mnemonic == "sub" ? d + v : d - v }
                    case "lea":
                        if ops.count == 2, ops[0] == .register(.rsp), case .memory(let m) = ops[1], m.base == .rsp, m.index == nil {
                            next = d - m.displacement
                        }
                    default: break
                    }
                }
                if next == nil { untracked[k] = unknown }
                if let n = next, !(0...4096).contains(n) {
                    throw DMPRefusal(.plan, "\(symbol.name) has \(n) bytes on the stack at \(location(i.address)) (0 to 4096 tracked)")
                }
                after = next
            }
            var successors: [Int] = []
            let ends = g.contains(.return) || g.contains(.interruptReturn) || g.contains(.interrupt)
                || (g.contains(.jump) && !g.contains(.conditionalBranch)) || i.mnemonic.hasPrefix("ud") || i.mnemonic == "hlt"
            if !ends, k + 1 < instructions.count { successors.append(k + 1) }
            if let b = i.branch, !g.contains(.call), g.contains(.jump), let t = index(at: b.target) { successors.append(t) }
            for t in successors {
                switch depths[t] {
                case .none:
                    depths[t] = after
                    work.append(t)
                case .some(let known) where known != after:
                    guard let known, let after else {
                        // An untracked change reaches an instruction reached with a known depth too.
                        if depths[t] != .some(nil) { depths[t] = .some(nil); work.append(t) }
                        continue
                    }
                    throw DMPRefusal(.plan, "the stack depth at \(location(instructions[t].address)) is \(known) or \(after) bytes by different paths (stack depth unknown)")
                default:
                    break
                }
            }
        }
        guard let reached = depths[target] else {
            throw DMPRefusal(.plan, "no path from \(symbol.name)'s start reaches \(location(address)) (stack depth unknown)")
        }
        guard let depth = reached else {
            throw untracked.sorted { $0.key < $1.key }.first?.value
                ?? DMPRefusal(.plan, "rsp changes in a way not tracked before \(location(address))")
        }
        return UInt64(depth)
    }
}

extension CallPromotion {
    /// The promoted calls of `copy` that run inside its copied function starting at `start`, and inside the
    /// accessors those calls name, transitively (a call promoted in an accessor that calls another accessor through
    /// a pointer), with the functions they lie in (`start`'s first). A copy of another caller that calls `start`'s
    /// function through a promoted call of its own keeps them, so that function serves there as it does in `copy`.
    package static func nested(in copy: FunctionCopy, from start: UInt64) -> (promotions: [CallPromotion], functions: [DecodedFunction]) {
        guard let first = copy.functions.first(where: { $0.start == start }) else { return ([], []) }
        var functions = [first]
        var promotions: [CallPromotion] = []
        var k = 0
        // Each function is added once: at most as many passes as copied functions.
        while k < functions.count {
            let f = functions[k]
            k += 1
            for p in copy.promotions where f.contains(p.site) && !promotions.contains(where: { $0.site == p.site }) {
                promotions.append(p)
                for a in p.accessors where !functions.contains(where: { $0.start == a }) {
                    if let g = copy.functions.first(where: { $0.start == a }) { functions.append(g) }
                }
            }
        }
        return (promotions, functions)
    }
}

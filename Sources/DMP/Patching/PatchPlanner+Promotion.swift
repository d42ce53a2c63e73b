import VMMKit
import X86Disassembler

/// The caller whose copy serves a hot instruction no entry reaches (``PatchPlanner/promotionRequest(for:registersAtExit:patches:)``).
package struct PromotionRequest: Sendable {
    /// The caller's start (the function to copy).
    package var caller: UInt64
    /// The accessor's start (the function holding the hot instruction).
    package var accessor: UInt64
    /// The call of the caller to promote (naming the accessor).
    package var promotion: CallPromotion
    /// Promotions that go along with ``promotion``: the caller's other indirect tail jumps promoted for the accessor,
    /// when ``promotion`` is one (``CallPromotion/tailJumps(in:to:image:disassembler:)``); or, when ``promotion`` calls a function
    /// that reached the accessor by its own indirect tail jump, that function's tail jumps promoted for the accessor.
    package var more: [CallPromotion] = []
}

extension PromotionRequest {
    /// The request serving `accessor` from `call`, the instruction of `caller` before the accessor's return address:
    /// `call` promoted (``CallPromotion/make(call:caller:accessor:in:disassembler:)``: an indirect call, or a direct
    /// call of a one-jump thunk); or, for a direct `call rel32` of another sized function F that reached the accessor
    /// by an indirect tail jump (gcc's sibling call after F's epilogue, which leaves no frame of F's on the stack:
    /// Linux's `serial8250_console_putchar` ending in `serial_port_out`'s `jmp rax` at -Os), F's indirect tail jumps
    /// with nothing pushed (``CallPromotion/tailJumps(in:to:image:disassembler:)``) guarded to the accessor's copy in a copy of F,
    /// the first as the request, the others in ``more``. Refuses with `make`'s reason (and F's, when it has no such
    /// jump) otherwise.
    ///
    /// `runtimeTarget`: where an indirect `call` went when it ran, as far as the registers at the accessor's exit tell
    /// (a guest value and a guess: it only chooses what to promote). When that is the start of another sized function
    /// F with indirect tail jumps with nothing pushed (serial_core.c's `uart_console_write` calling its `putchar`
    /// argument, `serial8250_console_putchar`, which ends in `serial_port_out`'s `jmp rax` to `io_serial_out`), the
    /// call is promoted for F, and F's tail jumps (in ``more``) for the accessor: the caller's copy calls F's copy,
    /// whose guarded jump reaches the accessor's. A promotion for the accessor itself would compare with the
    /// accessor's address, which that call never holds.
    package static func resolve(call: X86Instruction, caller: DecodedFunction, accessor: UInt64, runtimeTarget: UInt64? = nil,
                                in image: CodeImage, disassembler: X86Disassembler) throws(DMPRefusal) -> PromotionRequest {
        do {
            let promotion = try CallPromotion.make(call: call, caller: caller, accessor: accessor, in: image, disassembler: disassembler)
            if promotion.thunk == nil, let t = runtimeTarget, t != accessor, t != caller.start,
               let f = image.function(containing: t), f.address == t, let function = try? image.decode(f, disassembler: disassembler) {
                let jumps = CallPromotion.tailJumps(in: function, to: accessor, image: image, disassembler: disassembler)
                if !jumps.isEmpty {
                    return PromotionRequest(caller: caller.start, accessor: accessor,
                                            promotion: CallPromotion(site: promotion.site, target: promotion.target, accessors: [t]), more: jumps)
                }
            }
            return PromotionRequest(caller: caller.start, accessor: accessor, promotion: promotion)
        } catch {
            guard let (function, jumps) = try CallPromotion.tailJumpingCallee(of: call, to: accessor, in: image, disassembler: disassembler)
            else { throw error }
            guard let first = jumps.first else {
                throw DMPRefusal(.plan, "\(error.reason), and it has no indirect tail jump with nothing pushed")
            }
            return PromotionRequest(caller: function.start, accessor: accessor, promotion: first, more: Array(jumps.dropFirst()))
        }
    }
}

extension PatchPlanner {
    /// Finds, at the exit, the call that reached the function holding `located` (a function no entry of a copy
    /// reaches: a tiny accessor called only through a function pointer): the function is decoded from its start to
    /// the hot instruction tracking how much it pushed (``DecodedFunction/stackDepth(at:)``), the return address is
    /// read from the guest's stack through the exit's CR3, and the instruction ending there must be an indirect call
    /// of a sized function (or a direct call of a one-jump thunk) (``CallPromotion/make(call:caller:accessor:in:disassembler:)``),
    /// or a direct `call rel32` of another sized function F that reached the accessor by an indirect tail jump
    /// (gcc's sibling call: Linux's `serial8250_console_putchar` ends in `serial_port_out`'s `jmp rax` at -Os, so
    /// its frame is gone and the return address leads to its own direct call): F's indirect tail jumps with nothing
    /// pushed are then guarded to the accessor's copy in a copy of F (``PromotionRequest/resolve(call:caller:accessor:in:disassembler:)``),
    /// as one level up (``levelUpRequest(above:for:registersAtExit:patches:)``).
    /// A return address inside a live function copy (`patches`) stands for the original call it copies.
    /// The stack is the guest's: every value read is checked, never trusted; the promoted call compares the target at
    /// run time, so a wrong caller can cost only the patch, never correctness.
    package func promotionRequest(for located: LocatedInstruction, registersAtExit: Registers?,
                                  patches: [AppliedPatch]) throws(DMPRefusal) -> PromotionRequest {
        guard configuration.strategies.contains(.callPromotion) else { throw DMPRefusal(.plan, "call promotion is off") }
        guard located.specialRegisters.isLongMode64 else { throw DMPRefusal(.plan, "not 64-bit code") }
        guard let registers = registersAtExit else { throw DMPRefusal(.plan, "the registers at the exit could not be read") }
        let image = codeImage(paging: located.paging)
            .restoring(patches.flatMap(\.writes).map { PatchWrite(address: $0.virtual, original: $0.original, replacement: $0.replacement) })
        guard let symbol = image.function(containing: located.virtualAddress) else {
            throw DMPRefusal(.plan, "no sized function symbol covers \(hex(located.virtualAddress))")
        }
        let accessor = try image.decode(symbol, disassembler: disassembler)
        let depth = try accessor.stackDepth(at: located.virtualAddress)
        let slot = registers.rsp &+ depth
        guard let returnAddress = readStackWord(at: slot, located: located) else {
            throw DMPRefusal(.plan, "the return address of \(symbol.name) at rsp+\(depth) (\(hex(slot))) is not readable through the guest's page tables")
        }
        let (caller, call) = try call(returningTo: returnAddress, of: symbol.name, image: image, patches: patches)
        guard caller.start != symbol.address else { throw DMPRefusal(.plan, "\(symbol.name) is called from itself") }
        let target = runtimeTarget(of: call, rspAtCall: slot &+ 8, registers: registers, located: located)
        return try PromotionRequest.resolve(call: call, caller: caller, accessor: accessor.start, runtimeTarget: target,
                                            in: image, disassembler: disassembler)
    }

    /// The target an indirect `call` (FF /2) had when it ran, as far as the registers at the accessor's exit still
    /// tell: the register's value, or the 8-byte word its memory operand names (RSP as it was at the call,
    /// `rspAtCall`, just above the return address), read through the exit's paging. A guest value and a guess (the
    /// accessor may have changed the register since): it only chooses what to promote, never correctness. `nil` for
    /// other instructions and what cannot be read.
    private func runtimeTarget(of call: X86Instruction, rspAtCall: UInt64, registers: Registers, located: LocatedInstruction) -> UInt64? {
        let e = call.encoding
        guard e.map == .primary, e.opcode == 0xff, (e.modRM >> 3) & 7 == 2, let operand = call.operands.first?.operand else { return nil }
        var r = registers
        r.rsp = rspAtCall
        switch operand {
        case .register(let register):
            return register.value(in: r)
        case .memory(let m):
            return call.effectiveAddress(of: m, registers: r, segments: X86SegmentBases(located.specialRegisters))
                .flatMap { readStackWord(at: $0, located: located) }
        default:
            return nil
        }
    }

    /// The call instruction a return address read from the guest's stack returns from, and the function holding it:
    /// the instruction ending at `returnAddress` in the image, or the original call a live copy (`patches`) holds there.
    /// `callee` names the function whose return address it is, for the refusals.
    private func call(returningTo returnAddress: UInt64, of callee: String, image: CodeImage,
                      patches: [AppliedPatch]) throws(DMPRefusal) -> (caller: DecodedFunction, call: X86Instruction) {
        // The call: in the image, or the original call a live copy holds at that return address.
        let callAddress: UInt64
        if let copy = patches.lazy.compactMap({ $0.copy(holding: returnAddress) }).first {
            guard let original = copy.originalCall(returningTo: returnAddress) else {
                throw DMPRefusal(.plan, "the return address \(hex(returnAddress)) of \(callee) is inside a function copy, after no call")
            }
            callAddress = original
        } else {
            guard returnAddress > 0, let c = image.function(containing: returnAddress &- 1) else {
                throw DMPRefusal(.plan, "the return address \(hex(returnAddress)) of \(callee) is in no sized function")
            }
            let f = try image.decode(c, disassembler: disassembler)
            guard let i = f.instructions.first(where: { $0.nextAddress == returnAddress }) else {
                throw DMPRefusal(.plan, "the return address \(hex(returnAddress)) of \(callee) follows no instruction of \(c.name)")
            }
            callAddress = i.address
        }
        guard let c = image.function(containing: callAddress) else {
            throw DMPRefusal(.plan, "the call at \(hex(callAddress)) is in no sized function")
        }
        let caller = try image.decode(c, disassembler: disassembler)
        guard let k = caller.index(at: callAddress) else {
            throw DMPRefusal(.plan, "the call at \(hex(callAddress)) is no instruction start of \(c.name)")
        }
        return (caller, caller.instructions[k])
    }

    /// One level further up (DESIGN.md, DMP step 4; Documentation/DMP.md, *Tail jumps*): `request`'s caller (the
    /// function found on the stack above the hot function's frame) cannot be entered, so the frame above it is looked
    /// at. Its stack depth at the promoted call gives the slot of its own return address, above the accessor's;
    /// the instruction ending there must be either an indirect call (or a thunk call) of the caller, promoted as
    /// ``promotionRequest(for:registersAtExit:patches:)`` promotes one, or a direct `call rel32` of another sized
    /// function F, which then reached the caller by an indirect tail jump: F's tail jumps
    /// (``CallPromotion/tailJumps(in:to:image:disassembler:)``, at least one) are guarded to the caller's copy, the first as the
    /// request, the others in `more`. One level and one tail jump only: anything else refuses with the reason.
    /// `request.caller`, decoded, is returned as `middle` (a function the new copy serves, between F and the accessor).
    package func levelUpRequest(above request: PromotionRequest, for located: LocatedInstruction, registersAtExit: Registers?,
                                patches: [AppliedPatch]) throws(DMPRefusal) -> (request: PromotionRequest, more: [CallPromotion], middle: DecodedFunction) {
        guard let registers = registersAtExit else { throw DMPRefusal(.plan, "the registers at the exit could not be read") }
        let image = codeImage(paging: located.paging)
            .restoring(patches.flatMap(\.writes).map { PatchWrite(address: $0.virtual, original: $0.original, replacement: $0.replacement) })
        guard let symbol = image.function(containing: located.virtualAddress), symbol.address == request.accessor,
              let m = image.function(containing: request.caller), m.address == request.caller else {
            throw DMPRefusal(.plan, "the accessor or its caller starts no sized function")
        }
        let accessor = try image.decode(symbol, disassembler: disassembler)
        let middle = try image.decode(m, disassembler: disassembler)
        // A caller that reached the accessor by its own tail jump left no frame above the accessor's return address.
        if let k = middle.index(at: request.promotion.site),
           CallPromotion.isIndirectJump(middle.instructions[k]) || CallPromotion.isDirectJump32(middle.instructions[k]) {
            throw DMPRefusal(.plan, "\(m.name) reaches \(symbol.name) by a tail jump (no frame of its own to look above)")
        }
        // The accessor's return address is at rsp + its depth; the caller's frame starts above it.
        let depth = try accessor.stackDepth(at: located.virtualAddress) &+ 8 &+ middle.stackDepth(at: request.promotion.site)
        let slot = registers.rsp &+ depth
        guard let returnAddress = readStackWord(at: slot, located: located) else {
            throw DMPRefusal(.plan, "the return address of \(m.name) at rsp+\(depth) (\(hex(slot))) is not readable through the guest's page tables")
        }
        let (caller, call) = try call(returningTo: returnAddress, of: m.name, image: image, patches: patches)
        guard caller.start != middle.start else { throw DMPRefusal(.plan, "\(m.name) is called from itself") }
        if let (function, jumps) = try CallPromotion.tailJumpingCallee(of: call, to: middle.start, in: image, disassembler: disassembler) {
            if let first = jumps.first {
                return (PromotionRequest(caller: function.start, accessor: middle.start, promotion: first), Array(jumps.dropFirst()), middle)
            }
            throw DMPRefusal(.plan, "\(function.symbol.name), called at \(caller.location(call.address)) above \(m.name), "
                             + "has no indirect tail jump with nothing pushed")
        }
        let p = try CallPromotion.make(call: call, caller: caller, accessor: middle.start, in: image, disassembler: disassembler)
        return (PromotionRequest(caller: caller.start, accessor: middle.start, promotion: p), [], middle)
    }

    /// The key under which a copy promoting `request`'s call serves an accessor instruction whose own site (`site`,
    /// at the accessor's instruction) another caller's copy already serves: the access of `site` at the promoted
    /// call's address. A site record holds one patch; the accessor's instruction served from two callers' copies is
    /// two sites, each with its own grant, enable word and hit counter.
    package static func callerSite(_ site: ExitSite, request: PromotionRequest) -> ExitSite {
        ExitSite(rip: request.promotion.site, kind: site.kind, address: site.address, size: site.size, direction: site.direction)
    }

    /// The linear address `located`'s memory operand accesses with `registers` (MMIO grants), or `nil`.
    static func memoryTarget(of located: LocatedInstruction, registers: Registers?) -> UInt64? {
        located.instruction.memoryOperands.first?.memory.flatMap { m in
            registers.flatMap { located.instruction.effectiveAddress(of: m, registers: $0, segments: X86SegmentBases(located.specialRegisters)) }
        }
    }

    /// The 8-byte word (a stack slot, a function pointer) at the guest-virtual `address` under the exit's paging (user
    /// access at CPL3), or `nil`.
    private func readStackWord(at address: UInt64, located: LocatedInstruction) -> UInt64? {
        let access: PageAccess = located.cpl == 3 ? [.user] : []
        var value: UInt64 = 0
        for k in 0..<UInt64(8) {
            guard let t = try? vm.memory.translate(address &+ k, paging: located.paging, access: access),
                  let b = try? vm.memory.read(UInt8.self, at: t.physical) else { return nil }
            value |= UInt64(b) << (8 * k)
        }
        return value
    }

    /// Plans (and applies) a copy of `request`'s caller in which its call is promoted to a call of the accessor's
    /// copy serving `site` (and siblings a static reading of the accessor locates). `olds`: live patches whose
    /// copies hold the caller or the accessor, merged into this one (the first keeps its id, `owner`): their
    /// promotions and sites are kept, their entries retargeted or restored, their copies evicted into the new one.
    /// `live`: the patches in place, as for ``plan(_:located:registersAtExit:siblings:hotAt:owner:live:)``.
    /// `alsoServing`: other instructions of the accessor that this copy serves under their own site keys (another
    /// caller's copy of an accessor already served for a first caller: ``PromotionRequest/callerSite(_:)``).
    /// `nested`: promoted calls inside the accessor (and inside the accessors they name) that the copy keeps
    /// (``CallPromotion/nested(in:from:)``): the accessor is a function copy's own function, promoted one level up.
    package func promote(_ site: ExitSite, located: LocatedInstruction, registersAtExit: Registers?, request: PromotionRequest,
                         siblings: [ExitSite] = [], olds: [AppliedPatch], owner: Int, live: [AppliedPatch] = [],
                         alsoServing: [(site: ExitSite, address: UInt64, memoryTarget: UInt64?)] = [],
                         nested: [CallPromotion] = []) throws(DMPRefusal) -> PlanOutcome {
        let probeCode = GuestRange(start: implant.area.start, size: Implant.pageSize)
        let placement = try implant.placement(for: ImplantSite(located), code: probeCode, data: [implant.dataProbe], memory: vm.memory)
        // The promotions the old copies made of the same caller, with this one merged in.
        var promotions = olds.compactMap(\.copy).filter { $0.function.start == request.caller }.flatMap(\.promotions)
        func add(_ p: CallPromotion) throws(DMPRefusal) {
            guard let k = promotions.firstIndex(where: { $0.site == p.site }) else { return promotions.append(p) }
            guard promotions[k].target == p.target else {
                throw DMPRefusal(.plan, "the promoted call at \(hex(p.site)) was planned with another target")
            }
            for a in p.accessors where !promotions[k].accessors.contains(a) {
                guard promotions[k].accessors.count < CallPromotion.maximumAccessors else {
                    throw DMPRefusal(.plan, "the call at \(hex(p.site)) already compares \(CallPromotion.maximumAccessors) accessors")
                }
                promotions[k].accessors.append(a)
            }
        }
        try add(request.promotion)
        for p in request.more { try add(p) }
        // The caller's other calls through the same pointer are promoted too (best effort: one that cannot take
        // another accessor stays as it is).
        let restored = codeImage(paging: located.paging)
            .restoring(olds.flatMap(\.writes).map { PatchWrite(address: $0.virtual, original: $0.original, replacement: $0.replacement) })
        if let symbol = restored.function(containing: request.caller), symbol.address == request.caller,
           let caller = try? restored.decode(symbol, disassembler: disassembler) {
            for p in request.promotion.samePointerCalls(in: caller, image: restored, disassembler: disassembler) { try? add(p) }
        }
        // After the caller's own: the first promotion names the function copied.
        for p in nested { try add(p) }
        // Old copies of the accessor alone (served through their own entries) keep their sites: their grants go
        // into the accessor's copy, whose entry is now the promoted call.
        let served = Set(olds.flatMap(\.grants).map(\.plan.virtualAddress))
        var added: [Grant] = []
        let memoryTarget = PatchPlanner.memoryTarget(of: located, registers: registersAtExit)
        if !served.contains(located.virtualAddress) {
            added.append(try grant(for: site, instruction: located.instruction, virtualAddress: located.virtualAddress,
                                   physicalAddress: located.physicalAddress, memoryTarget: memoryTarget, cpl: located.cpl,
                                   placement: placement, paging: located.paging, kick: ringKick(for: located)))
        }
        do throws(DMPRefusal) {
            let image = restored
            for (other, address, target) in alsoServing where !served.contains(address) && address != located.virtualAddress {
                guard let insn = instruction(at: address, located: located, image: image),
                      let t = try? vm.memory.translate(address, paging: located.paging, access: [.execute]) else {
                    throw DMPRefusal(.plan, "the accessor's instruction at \(hex(address)) does not decode or translate")
                }
                added.append(try grant(for: other, instruction: insn, virtualAddress: address, physicalAddress: t.physical,
                                       memoryTarget: target, cpl: located.cpl, placement: placement, paging: located.paging,
                                       kick: ringKick(for: located)))
            }
            let oldSites = Set(olds.flatMap(\.sites))
            added += siblingGrants(siblings.filter { !oldSites.contains($0) }, of: located, placement: placement, image: image,
                                   primary: (site, memoryTarget))
                .filter { !served.contains($0.plan.virtualAddress) && $0.plan.virtualAddress != located.virtualAddress }
            return try functionCopy(located, olds.flatMap(\.grants) + added, placement: placement, owner: owner,
                                    rebuilding: olds, promotions: promotions, live: live)
        } catch {
            revoke(added)
            throw error
        }
    }
}

@testable import DMP
import Testing
import VMMKit
import X86Disassembler

/// Guarded indirect tail jumps (``CallPromotion`` at a `jmp r/m64`): the dispatch's encoding read back by the
/// decoder and walked path by path (RSP, RCX and the flags as the original jump leaves them), the tail jumps a
/// function offers, and the copy of `c-consoleops-cpl3-noalign`'s `put_field` whose `jmp rax` reaches a copy of
/// `uart_write`, promoted one level up.
@Suite("Guarded tail jumps")
struct TailJumpTests {
    static let base: UInt64 = 0x30_0000

    /// The guarded form of the jump `bytes` (decoded at `site`) for `accessors`, emitted and decoded back whole as
    /// ``CallPromotionTests/promoted(_:site:target:accessors:_:)`` does for calls.
    func guarded(_ bytes: [UInt8], site: UInt64 = 0x10_1000, target: CallPromotion.Target, accessors: [UInt64],
                 _ d: X86Disassembler) throws -> (jump: X86Instruction, decoded: [X86Instruction], entries: [UInt64]) {
        let jump = try d.decode(bytes, address: site, mode: .bits64)
        #expect(CallPromotion.isIndirectJump(jump))
        let (_, decoded, entries) = try CallPromotionTests().promoted(bytes, site: site, target: target, accessors: accessors, d)
        return (jump, decoded, entries)
    }

    /// How one path through a dispatch ends: the jump it leaves by, with RSP, the saved registers and RCX as they are there.
    struct PathEnd: Equatable {
        var jump: String
        var target: UInt64?
        var rsp: Int64
        var saved: [String]
        var rcxClobbered: Bool
    }

    /// Walks every path of the dispatch `body` from its first instruction (both ways at each `jrcxz`) to the unconditional
    /// jump that leaves it, tracking RSP (`lea rsp`, `push`, `pop`), the registers pushed, and whether RCX holds anything
    /// but its own value. Any instruction other than those the dispatch may use fails. `expectLoad` checks each `mov rcx,
    /// [m]`'s operand at the RSP of that point.
    func paths(_ body: [X86Instruction], expectLoad: (X86Instruction, Int64) -> Void = { _, _ in }) -> [PathEnd] {
        var ends: [PathEnd] = []
        var work: [(k: Int, end: PathEnd)] = [(0, PathEnd(jump: "", target: nil, rsp: 0, saved: [], rcxClobbered: false))]
        var steps = 0
        while let (k0, s0) = work.popLast() {
            var k = k0, s = s0
            while k < body.count, steps < 1000 {
                steps += 1
                let i = body[k]
                let ops = i.operands.map(\.operand)
                #expect(i.flagsWritten.isEmpty, "\(i) writes no flag")
                switch i.mnemonic {
                case "lea" where ops.first == .register(.rsp):
                    guard case .memory(let m) = ops[1], m.base == .rsp else { Issue.record("\(i)"); return ends }
                    s.rsp += m.displacement
                case "lea" where ops.first == .register(.rcx):
                    s.rcxClobbered = true
                case "mov" where ops.first == .register(.rcx):
                    expectLoad(i, s.rsp)
                    s.rcxClobbered = true
                case "push":
                    s.saved.append(i.operands.first.map { "\($0.operand)" } ?? "?")
                    s.rsp -= 8
                case "pop":
                    #expect(s.saved.popLast() == i.operands.first.map { "\($0.operand)" }, "\(i) pops what was pushed")
                    s.rcxClobbered = false
                    s.rsp += 8
                case "jrcxz":
                    if let t = i.branch?.target, let j = body.firstIndex(where: { $0.address == t }) { work.append((j, s)) }
                    else { Issue.record("\(i) lands inside the dispatch") }
                case "jmp":
                    s.jump = i.description
                    s.target = i.branch?.target
                    ends.append(s)
                    k = body.count
                    continue
                default:
                    Issue.record("\(i) is not an instruction the dispatch uses")
                    return ends
                }
                k += 1
            }
        }
        return ends
    }

    @Test("guarded jmp r64 / notrack jmp / jmp [m] / jmp [rsp+d] / jmp [rip+d] / jmp [index*8+d]: below the red zone, rcx saved, the target compared by lea/jrcxz, every path leaves with rsp, rcx and the flags as the original jump would, the miss by the original jump itself",
          arguments: [
              ([0xff, 0xe0], CallPromotion.Target.register(.rax)),
              ([0x3e, 0xff, 0xe0], .register(.rax)),
              ([0x41, 0xff, 0xe1], .register(.r9)),
              ([0xff, 0xe1], .register(.rcx)),
              ([0xff, 0x63, 0x08], .memory(.init(base: .rbx, displacement: 8))),
              ([0xff, 0x64, 0x24, 0x08], .memory(.init(base: .rsp, displacement: 8))),
              ([0xff, 0x25, 0x00, 0x01, 0x00, 0x00], .memory(.at(0x10_1106))),
              ([0xff, 0x24, 0xc5, 0x40, 0x20, 0x10, 0x00], .memory(.init(index: .rax, scale: 8, displacement: 0x10_2040))),
          ] as [([UInt8], CallPromotion.Target)])
    func shapes(_ bytes: [UInt8], target: CallPromotion.Target) throws {
        let d = try X86Disassembler()
        for accessors in [[0x10_1d1d], [0x10_1d1d, 0x10_1d0c, 0x10_2000, 0x10_0f00]] as [[UInt64]] {
            let (jump, i, entries) = try guarded(bytes, target: target, accessors: accessors, d)
            #expect(i[0].description == "lea rsp, [rsp - 0x80]" && i[1].description == "push rcx", "\(i.map(\.description))")
            let ends = paths(i) { load, rsp in
                // The target as the original jump sees it: RSP-based operands 136 further, RIP-relative ones at the same address.
                guard case .memory(let m)? = load.operands.last?.operand else { return }
                switch target {
                case .memory(let t) where t.base == .rsp:
                    #expect(m.base == .rsp && m.displacement + rsp == t.displacement, "\(load)")
                case .memory(let t) where t.absolute != nil:
                    #expect(m.isRIPRelative && load.nextAddress &+ UInt64(bitPattern: m.displacement) == t.absolute, "\(load)")
                default:
                    break
                }
            }
            #expect(ends.count == accessors.count + 1, "one way out per accessor and the miss")
            for e in ends { #expect(e.rsp == 0 && e.saved.isEmpty && !e.rcxClobbered, "\(e)") }
            // Each hit jumps to its own accessor's copy; the miss is the original jump, re-encoded where it lies now.
            #expect(Set(ends.compactMap(\.target)) == Set(entries), "\(ends)")
            let miss = try #require(ends.first { $0.target == nil })
            let original = try #require(i.first { $0.description == miss.jump })
            #expect(original.bytes.first == bytes.first && original.operands.count == 1)
            if case .memory(let t) = target, let absolute = t.absolute {
                let m = try #require(original.memoryOperands.first?.memory)
                #expect(m.isRIPRelative && original.nextAddress &+ UInt64(bitPattern: m.displacement) == absolute)
            } else {
                #expect(original.description == jump.description, "\(original) for \(jump)")
            }
            #expect(i.allSatisfy { $0.mnemonic != "call" && $0.mnemonic != "ret" }, "a jump stays a jump: nothing pushed for a return")
        }
    }

    /// `bytes` decoded as a sized function `name` at `address`.
    func function(_ bytes: [UInt8], at address: UInt64 = 0x1000, name: String = "f", _ d: X86Disassembler) throws -> DecodedFunction {
        try DecodedFunction.decode(GuestSymbol(name: name, address: address, size: UInt64(bytes.count), isFunction: true),
                                   bytes: bytes, disassembler: d)
    }

    @Test("the tail jumps a function offers: indirect jumps with nothing pushed, not a jump with a frame still on the stack, not rsp as the target")
    func tailJumpsOffered() throws {
        let d = try X86Disassembler()
        let image = CodeImage(regions: [], symbols: SymbolTable([]))
        // push rbx; pop rbx; jmp [rdi + 8]
        let f = try function([0x53, 0x5b, 0xff, 0x67, 0x08], d)
        #expect(CallPromotion.tailJumps(in: f, to: 0x2000, image: image, disassembler: d)
                    == [CallPromotion(site: 0x1002, target: .memory(.init(base: .rdi, displacement: 8)), accessors: [0x2000])])
        // push rbx; jmp rax: a frame on the stack, no tail call.
        let g = try function([0x53, 0xff, 0xe0], d)
        #expect(CallPromotion.tailJumps(in: g, to: 0x2000, image: image, disassembler: d).isEmpty)
        // jmp rsp; a call through rax is no jump.
        let h = try function([0xff, 0xd0, 0xff, 0xe4], d)
        #expect(CallPromotion.tailJumps(in: h, to: 0x2000, image: image, disassembler: d).isEmpty)
        // A guarded jump's promotion has no same-pointer calls (call rax here is a call, the promotion a jump).
        let j = try function([0xff, 0xd0, 0xff, 0xe0], d)
        let tails = CallPromotion.tailJumps(in: j, to: 0x2000, image: image, disassembler: d)
        #expect(tails.map(\.site) == [0x1002])
        #expect(tails.first?.samePointerCalls(in: j, image: image, disassembler: d).isEmpty == true)
    }

    @Test("a direct tail jump to a function copied alongside goes to its copy, not to the original")
    func directTailJumpToCopiedFunction() throws {
        let d = try X86Disassembler()
        // f at 0x1000: call rax; jmp 0x2000 (g). g at 0x2000: out dx, al; ret.
        let f = try function([0xff, 0xd0, 0xe9, 0xf9, 0x0f, 0x00, 0x00], d)
        let g = try function([0xee, 0xc3], at: 0x2000, name: "g", d)
        let copy = try FunctionCopy(f, at: Self.base, promotions: [CallPromotion(site: 0x1000, target: .register(.rax), accessors: [0x2000])],
                                    accessors: [FunctionCopy.Accessor(function: g, rewrites: [HotRewrite(address: 0x2000, bytes: [0x90])])])
        let all = d.decodeAll(copy.bytes, address: copy.address)
        let gCopy = try #require(copy.copyAddress(of: 0x2000))
        // The jump's own piece (the pad after the call comes before it).
        let tail = try #require(copy.pieces.first { $0.original == 0x1002 && $0.kind == .relocated })
        #expect(all.first { $0.address == tail.copy.lowerBound }?.branch?.target == gCopy, "\(all.map(\.description))")
    }

    @Test("c-consoleops-cpl3-noalign: put_field's jmp rax (after its epilogue) guarded to a copy of uart_write, whose call through ops->putc calls uart_putc's copy, which keeps its promoted call to uart_ready: the copy decodes whole, the guarded jump reaches uart_write's copy, entered through put_field's call sites")
    func putFieldTailJump() throws {
        let image = try CGuestCopyTests.image("c-consoleops-cpl3-noalign")
        let d = try X86Disassembler()
        func decoded(_ name: String) throws -> DecodedFunction {
            try image.decode(try #require(image.symbols.symbols.filter { $0.name == name && $0.size > 0 }.max { $0.size < $1.size }), disassembler: d)
        }
        let putField = try decoded("put_field"), write = try decoded("uart_write"), putc = try decoded("uart_putc"), ready = try decoded("uart_ready")
        let tails = CallPromotion.tailJumps(in: putField, to: write.start, image: image, disassembler: d)
        #expect(tails.count == 1 && tails.first?.target == .register(.rax), "\(tails)")
        let tail = try #require(tails.first)
        #expect(putField.location(tail.site) == "put_field+0x61")
        // uart_write ends in returns; kprintf's jump table dispatch is no tail jump.
        #expect(CallPromotion.tailJumps(in: write, to: putc.start, image: image, disassembler: d).isEmpty)
        #expect(CallPromotion.tailJumps(in: try decoded("kprintf"), to: putc.start, image: image, disassembler: d).isEmpty)
        let writeCall = try #require(write.instructions.first { $0.description == "call qword ptr [rax]" })
        let readyCall = try #require(putc.instructions.first { $0.description == "call qword ptr [rax + 0x18]" })
        let promotions = [tail,
                          try CallPromotion.make(call: writeCall, caller: write, accessor: putc.start, in: image, disassembler: d),
                          try CallPromotion.make(call: readyCall, caller: putc, accessor: ready.start, in: image, disassembler: d)]
        let hot = [write, putc, ready].map { a in
            FunctionCopy.Accessor(function: a, rewrites: a.instructions.filter { $0.groups.contains(.portIO) }
                .map { HotRewrite(address: $0.address, bytes: [0x90]) })
        }
        let plan = try FunctionCopyPlan.make(hot: [], in: image, at: 0xf0_0000, disassembler: d, promotions: promotions, accessors: hot)
        let copy = plan.copy
        #expect(copy.function.start == putField.start && copy.accessors.map(\.start) == [write.start, putc.start, ready.start])
        let all = d.decodeAll(copy.bytes, address: copy.address)
        #expect(all.reduce(0) { $0 + $1.length } == copy.bytes.count)
        // The guarded jump's hit goes to uart_write's copy; its miss is put_field's own jmp rax.
        let body = try #require(copy.pieces.first { $0.original == tail.site })
        #expect(body.kind == .rewritten)
        let inBody = all.filter { body.copy.contains($0.address) }
        let writeEntry = try #require(copy.copyAddress(of: write.start))
        #expect(inBody.contains { $0.mnemonic == "jmp" && $0.branch?.target == writeEntry }, "\(inBody.map(\.description))")
        #expect(inBody.contains { $0.description == "jmp rax" })
        let ends = paths(inBody)
        #expect(ends.count == 2 && ends.allSatisfy { $0.rsp == 0 && $0.saved.isEmpty && !$0.rcxClobbered }, "\(ends)")
        // No return lands in a jump's body; the jump no longer counts as one that lands in the original.
        #expect(copy.originalCall(returningTo: body.copy.lowerBound + 1) == nil)
        #expect(!copy.indirectJumps.contains(tail.site))
        // uart_write's promoted call calls uart_putc's copy.
        let putcEntry = try #require(copy.copyAddress(of: putc.start))
        #expect(all.contains { $0.mnemonic == "call" && $0.branch?.target == putcEntry && write.contains(copy.originalAddress(of: $0.address) ?? 0) })
        // put_field is called directly (kprintf): its call sites are the way in.
        #expect(plan.entries.contains { $0.kind == .callSite }, "\(plan.entries.map(\.kind)) \(plan.entryRefusals)")
        // Only a call or an indirect jump is promoted.
        let notBranch = try #require(putField.instructions.first)
        #expect(throws: DMPRefusal.self) {
            try FunctionCopy(putField, at: 0xf0_0000, promotions: [CallPromotion(site: notBranch.address, target: .register(.rax), accessors: [write.start])],
                             accessors: [hot[0]])
        }
    }

    @Test("c-linux8250-cpl3-Os: the THR write's return address leads to uart_console_write's direct call of serial8250_console_putchar, which reached io_serial_out by its sibling call (jmp rax after the epilogue): that call alone cannot be promoted, the request guards serial8250_console_putchar's tail jump to io_serial_out's copy, and the copy (entered through its call sites) decodes whole")
    func directCallOfTailJumpingFunction() throws {
        let image = try CGuestCopyTests.image("c-linux8250-cpl3-Os")
        let d = try X86Disassembler()
        func decoded(_ name: String) throws -> DecodedFunction {
            try image.decode(try #require(image.symbols.symbols.first { $0.name.hasPrefix(name) && $0.size > 0 }), disassembler: d)
        }
        let write = try decoded("uart_console_write"), putchar = try decoded("serial8250_console_putchar"), out = try decoded("io_serial_out")
        let call = try #require(write.instructions.last { $0.mnemonic == "call" && $0.branch?.target == putchar.start })
        // Neither an indirect call nor a call of a one-jump thunk.
        #expect(throws: DMPRefusal.self) {
            try CallPromotion.make(call: call, caller: write, accessor: out.start, in: image, disassembler: d)
        }
        let request = try PromotionRequest.resolve(call: call, caller: write, accessor: out.start, in: image, disassembler: d)
        #expect(request.caller == putchar.start && request.accessor == out.start && request.more.isEmpty)
        #expect(putchar.location(request.promotion.site) == "serial8250_console_putchar+0x2a" && request.promotion.target == .register(.rax),
                "\(request.promotion)")
        // A direct call of the accessor itself, or of a function with no tail jump, is no such request.
        let wait = try #require(putchar.instructions.first { $0.mnemonic == "call" })
        #expect(throws: DMPRefusal.self) {
            try PromotionRequest.resolve(call: wait, caller: putchar, accessor: out.start, in: image, disassembler: d)
        }
        let hot = FunctionCopy.Accessor(function: out, rewrites: out.instructions.filter { $0.groups.contains(.portIO) }
            .map { HotRewrite(address: $0.address, bytes: [0x90]) })
        let plan = try FunctionCopyPlan.make(hot: [], in: image, at: 0xf0_0000, disassembler: d, promotions: [request.promotion], accessors: [hot])
        let copy = plan.copy
        #expect(copy.function.start == putchar.start && copy.accessors.map(\.start) == [out.start])
        let all = d.decodeAll(copy.bytes, address: copy.address)
        #expect(all.reduce(0) { $0 + $1.length } == copy.bytes.count)
        let body = try #require(copy.pieces.first { $0.original == request.promotion.site })
        let outEntry = try #require(copy.copyAddress(of: out.start))
        #expect(all.filter { body.copy.contains($0.address) }.contains { $0.mnemonic == "jmp" && $0.branch?.target == outEntry })
        #expect(plan.entries.contains { $0.kind == .callSite }, "\(plan.entries.map(\.kind)) \(plan.entryRefusals)")
    }

    @Test("c-linux8250-earlycon-cpl3-Os: uart_console_write calls its putchar argument (call r13); when it held serial8250_console_putchar at the THR write's exit, which reached io_serial_out by its sibling call, the call is promoted for serial8250_console_putchar and its tail jump for io_serial_out (a promotion for io_serial_out would compare with an address the call never holds); other runtime targets keep the promotion for the accessor")
    func indirectCallOfTailJumpingFunction() throws {
        let image = try CGuestCopyTests.image("c-linux8250-earlycon-cpl3-Os")
        let d = try X86Disassembler()
        func decoded(_ name: String) throws -> DecodedFunction {
            try image.decode(try #require(image.symbols.symbols.first { $0.name == name && $0.size > 0 }), disassembler: d)
        }
        let write = try decoded("uart_console_write"), putchar = try decoded("serial8250_console_putchar")
        let out = try decoded("io_serial_out"), early = try decoded("serial_putc")
        let call = try #require(write.instructions.last { $0.description == "call r13" })
        let request = try PromotionRequest.resolve(call: call, caller: write, accessor: out.start, runtimeTarget: putchar.start,
                                                   in: image, disassembler: d)
        #expect(request.caller == write.start && request.accessor == out.start)
        #expect(request.promotion.site == call.address && request.promotion.target == .register(.r13) && request.promotion.accessors == [putchar.start])
        #expect(request.more == CallPromotion.tailJumps(in: putchar, to: out.start, image: image, disassembler: d) && request.more.count == 1)
        // No runtime target, the accessor itself, or a function with no tail jump: the call promoted for the accessor.
        for target in [nil, out.start, early.start] as [UInt64?] {
            let plain = try PromotionRequest.resolve(call: call, caller: write, accessor: out.start, runtimeTarget: target, in: image, disassembler: d)
            #expect(plain.promotion.accessors == [out.start] && plain.more.isEmpty, "\(String(describing: target))")
        }
        // The caller's copy calls serial8250_console_putchar's copy, whose guarded jmp rax reaches io_serial_out's.
        let accessors = [putchar, out].map { a in
            FunctionCopy.Accessor(function: a, rewrites: a.instructions.filter { $0.groups.contains(.portIO) }
                .map { HotRewrite(address: $0.address, bytes: [0x90]) })
        }
        let plan = try FunctionCopyPlan.make(hot: [], in: image, at: 0xf0_0000, disassembler: d,
                                             promotions: [request.promotion] + request.more, accessors: accessors)
        let copy = plan.copy
        #expect(copy.function.start == write.start && copy.accessors.map(\.start) == [putchar.start, out.start])
        let all = d.decodeAll(copy.bytes, address: copy.address)
        #expect(all.reduce(0) { $0 + $1.length } == copy.bytes.count)
        let putcharEntry = try #require(copy.copyAddress(of: putchar.start)), outEntry = try #require(copy.copyAddress(of: out.start))
        #expect(all.contains { $0.mnemonic == "call" && $0.branch?.target == putcharEntry })
        let tail = try #require(request.more.first)
        let body = try #require(copy.pieces.first { $0.original == tail.site })
        #expect(all.filter { body.copy.contains($0.address) }.contains { $0.mnemonic == "jmp" && $0.branch?.target == outEntry })
    }
}

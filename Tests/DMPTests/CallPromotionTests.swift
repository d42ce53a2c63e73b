@testable import DMP
import Testing
import VMMKit
import X86Disassembler

/// Call promotion (``CallPromotion``): the promoted call's encoding read back by the decoder, the
/// stack depth of an accessor, and the copies of the -Os and -O1 C UART guests' callers.
@Suite("Call promotion")
struct CallPromotionTests {
    static let base: UInt64 = 0x30_0000

    /// The promoted call of `call` (decoded from `callBytes` at `site`) for `accessors`, emitted at `base`, with
    /// each accessor's copy at `base + 0x1000 + 0x100 × k`, decoded back.
    func promoted(_ callBytes: [UInt8], site: UInt64 = 0x10_1000, target: CallPromotion.Target, accessors: [UInt64],
                  _ d: X86Disassembler) throws -> (bytes: [UInt8], decoded: [X86Instruction], entries: [UInt64]) {
        let call = try d.decode(callBytes, address: site, mode: .bits64)
        let entries = accessors.indices.map { Self.base + 0x1000 + 0x100 * UInt64($0) }
        var a = X86Assembler(origin: Self.base)
        try CallPromotion.emit(CallPromotion(site: site, target: target, accessors: accessors), call: call,
                               entries: entries.map { .absolute($0) }, into: &a)
        let bytes = try a.finish()
        let decoded = d.decodeAll(bytes, address: Self.base)
        #expect(decoded.reduce(0) { $0 + $1.length } == bytes.count, "the whole body decodes")
        return (bytes, decoded, entries)
    }

    @Test("call [rbx+0x10] promoted for one accessor: save rcx, load the target, compare by lea/jrcxz, the original call or the copy's, rcx restored on both paths")
    func memoryTargetOneAccessor() throws {
        let d = try X86Disassembler()
        let (_, i, entries) = try promoted([0xff, 0x53, 0x10], target: .memory(.init(base: .rbx, displacement: 0x10)),
                                           accessors: [0x101d1d], d)
        #expect(i.map(\.description) == [
            "push rcx", "mov rcx, qword ptr [rbx + 0x10]", "lea rcx, [rcx - 0x101d1d]", "jrcxz 0x\(String(i[7].address, radix: 16))",
            "pop rcx", "call qword ptr [rbx + 0x10]", "jmp 0x\(String(i.last!.nextAddress, radix: 16))",
            "pop rcx", "call 0x\(String(entries[0], radix: 16))",
        ], "\(i.map(\.description))")
        #expect(i[3].branch?.target == i[7].address, "jrcxz goes to the hit path")
        #expect(i[6].branch?.target == i[8].nextAddress, "the miss path joins after the hit path")
        #expect(i.allSatisfy { $0.flagsWritten.isEmpty }, "no instruction of the body writes a flag")
    }

    @Test("call r13 promoted for two accessors: the second compare is relative to the first, each hit calls its own copy")
    func registerTargetTwoAccessors() throws {
        let d = try X86Disassembler()
        let (_, i, entries) = try promoted([0x41, 0xff, 0xd5], target: .register(.r13), accessors: [0x101d1d, 0x101d0c], d)
        let text = i.map(\.description)
        #expect(text.prefix(6) == ["push rcx", "mov rcx, r13", "lea rcx, [rcx - 0x101d1d]", text[3], "lea rcx, [rcx + 0x11]", text[5]], "\(text)")
        #expect(i[3].mnemonic == "jrcxz" && i[5].mnemonic == "jrcxz")
        #expect(text[6...8] == ["pop rcx", "call r13", text[8]])
        let calls = i.filter { $0.mnemonic == "call" && $0.branch != nil }.compactMap(\.branch?.target)
        #expect(calls == entries)
        // Each jrcxz lands on a `pop rcx` followed by the call of its own accessor's copy.
        for (k, j) in [3, 5].enumerated() {
            let hit = try #require(i.firstIndex { $0.address == i[j].branch?.target })
            #expect(i[hit].description == "pop rcx" && i[hit + 1].branch?.target == entries[k])
        }
        #expect(i.allSatisfy { $0.flagsWritten.isEmpty })
    }

    @Test("an RSP-based target moves by the push; a RIP-relative one keeps its absolute address; the original call is refitted")
    func stackAndRIPRelativeTargets() throws {
        let d = try X86Disassembler()
        let (_, s, _) = try promoted([0xff, 0x54, 0x24, 0x08], target: .memory(.init(base: .rsp, displacement: 8)), accessors: [0x1000], d)
        #expect(s[1].description == "mov rcx, qword ptr [rsp + 0x10]" && s[5].description == "call qword ptr [rsp + 8]")
        // call [rip + 0x100] at 0x101000 (6 bytes): the pointer at 0x101106.
        let (_, r, _) = try promoted([0xff, 0x15, 0x00, 0x01, 0x00, 0x00], site: 0x10_1000, target: .memory(.at(0x10_1106)),
                                     accessors: [0x1000], d)
        for k in [1, 5] {
            let m = try #require(r[k].memoryOperands.first?.memory)
            #expect(m.isRIPRelative && r[k].nextAddress &+ UInt64(bitPattern: m.displacement) == 0x10_1106, "\(r[k])")
        }
    }

    @Test("refusals: no accessor, more than four, an accessor beyond a 32-bit compare")
    func encodingRefusals() throws {
        let d = try X86Disassembler()
        let call = try d.decode([0x41, 0xff, 0xd5], address: 0x1000, mode: .bits64)
        for accessors in [[], [1, 2, 3, 4, 5], [0x1_0000_0000]] as [[UInt64]] {
            var a = X86Assembler(origin: Self.base)
            #expect(throws: DMPRefusal.self) {
                try CallPromotion.emit(CallPromotion(site: 0x1000, target: .register(.r13), accessors: accessors), call: call,
                                       entries: accessors.map { .absolute($0) }, into: &a)
            }
        }
    }

    @Test("the stack depth of an accessor: pushes, sub/add rsp, lea rsp, along every path; refused where paths disagree, none arrives or rsp changes untracked")
    func stackDepth() throws {
        let d = try X86Disassembler()
        func function(_ bytes: [UInt8]) throws -> DecodedFunction {
            try DecodedFunction.decode(GuestSymbol(name: "f", address: 0x1000, size: UInt64(bytes.count), isFunction: true),
                                       bytes: bytes, disassembler: d)
        }
        // push rbx; sub rsp, 0x18; lea rsp, [rsp - 8]; add rsp, 8; in al, dx; ret
        let f = try function([0x53, 0x48, 0x83, 0xec, 0x18, 0x48, 0x8d, 0x64, 0x24, 0xf8, 0x48, 0x83, 0xc4, 0x08, 0xec, 0xc3])
        #expect(try f.stackDepth(at: 0x100e) == 0x20)
        #expect(try f.stackDepth(at: 0x1000) == 0)
        // test edi, edi; je +1; push rax; in al, dx; ret: the push may be skipped.
        let g = try function([0x85, 0xff, 0x74, 0x01, 0x50, 0xec, 0xc3])
        #expect(throws: DMPRefusal.self) { try g.stackDepth(at: 0x1005) }
        // test edi, edi; jne <ret>; push rax; in al, dx; pop rax; ret: the branch not taken on the way, 8 bytes pushed.
        let j = try function([0x85, 0xff, 0x75, 0x03, 0x50, 0xec, 0x58, 0xc3])
        #expect(try j.stackDepth(at: 0x1005) == 8)
        // call 0x2000; in al, dx; ret: the call returned, its return address popped.
        let c = try function([0xe8, 0xfb, 0x0f, 0x00, 0x00, 0xec, 0xc3])
        #expect(try c.stackDepth(at: 0x1005) == 0)
        // call rax; in al, dx; ret: an indirect call returns with RSP as it was, like a direct one.
        let r = try function([0xff, 0xd0, 0xec, 0xc3])
        #expect(try r.stackDepth(at: 0x1002) == 0)
        // push rbx; test edi, edi; jne L; pause; L: call rax; test eax, eax; je L; in al, dx; pop rbx; ret:
        // branches landing on the way (clang's shape: a poll loop through a pointer before the access), every
        // path with 8 bytes pushed.
        let l = try function([0x53, 0x85, 0xff, 0x75, 0x02, 0xf3, 0x90, 0xff, 0xd0, 0x85, 0xc0, 0x74, 0xfa, 0xec, 0x5b, 0xc3])
        #expect(try l.stackDepth(at: 0x100d) == 8)
        // test edi, edi; je L; push rax; L: jmp M; M: in al, dx; ret: the paths disagree (0 and 8) even after a jump.
        let m = try function([0x85, 0xff, 0x74, 0x01, 0x50, 0xeb, 0x00, 0xec, 0xc3])
        #expect(throws: DMPRefusal.self) { try m.stackDepth(at: 0x1007) }
        // ret; in al, dx: nothing reaches the in.
        let u = try function([0xc3, 0xec, 0xc3])
        #expect(throws: DMPRefusal.self) { try u.stackDepth(at: 0x1001) }
        // test edi, edi; je L; mov rsp, rbp; L: in al, dx; ret: an untracked change on one path.
        let v = try function([0x85, 0xff, 0x74, 0x03, 0x48, 0x89, 0xec, 0xec, 0xc3])
        #expect(throws: DMPRefusal.self) { try v.stackDepth(at: 0x1007) }
        // mov rsp, rbp; in al, dx; ret
        let h = try function([0x48, 0x89, 0xec, 0xec, 0xc3])
        #expect(throws: DMPRefusal.self) { try h.stackDepth(at: 0x1003) }
    }

    /// The image, the decoder, and a decoded function of it.
    func decoded(_ name: String, _ image: CodeImage, _ d: X86Disassembler) throws -> DecodedFunction {
        try image.decode(try #require(image.symbols.symbols.first { $0.name == name && $0.size > 0 }), disassembler: d)
    }

    @Test("c-uart-cpl3-Os: serial_in is called as call [rbx+0x10], serial_out through a one-jump thunk whose [rdi+0x18] is read at the call")
    func osCallers() throws {
        let image = try CGuestCopyTests.image("c-uart-cpl3-Os")
        let d = try X86Disassembler()
        let putchar = try decoded("serial8250_console_putchar", image, d)
        let inSlow = try decoded("io_serial_in_slow", image, d), outSlow = try decoded("io_serial_out_slow", image, d)
        let calls = putchar.instructions.filter { $0.groups.contains(.call) }
        #expect(calls.count == 2)
        let pIn = try CallPromotion.make(call: calls[0], caller: putchar, accessor: inSlow.start, in: image, disassembler: d)
        #expect(pIn.target == .memory(.init(base: .rbx, displacement: 0x10)) && pIn.thunk == nil)
        let pOut = try CallPromotion.make(call: calls[1], caller: putchar, accessor: outSlow.start, in: image, disassembler: d)
        #expect(pOut.target == .memory(.init(base: .rdi, displacement: 0x18)))
        #expect(pOut.thunk?.address == image.symbols.symbols.first { $0.name == "serial_out" }?.address)
        // A call of the accessor itself, or of anything else than a thunk, is no promotion.
        let initPort = try decoded("serial8250_init_port", image, d)
        let direct = try #require(initPort.instructions.first { $0.groups.contains(.call) })
        #expect(throws: DMPRefusal.self) { try CallPromotion.make(call: direct, caller: initPort, accessor: direct.branch!.target, in: image, disassembler: d) }
        let notCall = try #require(putchar.instructions.first)
        #expect(throws: DMPRefusal.self) { try CallPromotion.make(call: notCall, caller: putchar, accessor: inSlow.start, in: image, disassembler: d) }
        // Each accessor pushes nothing before its port access: the return address is at rsp.
        for f in [inSlow, outSlow] {
            for i in f.instructions where i.groups.contains(.portIO) { #expect(try f.stackDepth(at: i.address) == 0) }
        }
    }

    @Test("c-uart-cpl3-O1: the other calls of serial8250_init_port through the same pointer (call [rbx+0x18]) are promoted with the first, the call through [rbx+0x10] and call r8 are not")
    func samePointerCalls() throws {
        let image = try CGuestCopyTests.image("c-uart-cpl3-O1")
        let d = try X86Disassembler()
        let initPort = try decoded("serial8250_init_port", image, d)
        let outSlow = try decoded("io_serial_out_slow", image, d)
        let calls = initPort.instructions.filter { $0.groups.contains(.call) }
        let viaOut = calls.filter { $0.description == "call qword ptr [rbx + 0x18]" }
        #expect(viaOut.count == 7, "\(calls.map(\.description))")
        #expect(calls.count == 9, "\(calls.map(\.description))")
        let first = try CallPromotion.make(call: viaOut[0], caller: initPort, accessor: outSlow.start, in: image, disassembler: d)
        let others = first.samePointerCalls(in: initPort, image: image, disassembler: d)
        #expect(others.map(\.site) == viaOut.dropFirst().map(\.address))
        #expect(others.allSatisfy { $0.accessors == [outSlow.start] && $0.target == first.target })
    }

    @Test("c-uart-cpl3-Os and -O1: the caller's copy with both calls promoted decodes whole, maps every accessor instruction back, and is entered on the way to the calls",
          arguments: ["c-uart-cpl3-Os", "c-uart-cpl3-O1"])
    func promotedCopy(_ name: String) throws {
        let image = try CGuestCopyTests.image(name)
        let d = try X86Disassembler()
        let putchar = try decoded("serial8250_console_putchar", image, d)
        let accessors = try ["io_serial_in_slow", "io_serial_out_slow"].map { try decoded($0, image, d) }
        let calls = putchar.instructions.filter { $0.groups.contains(.call) }
        let promotions = try zip(calls, accessors).map { c, a in
            try CallPromotion.make(call: c, caller: putchar, accessor: a.start, in: image, disassembler: d)
        }
        let hot = accessors.map { a in
            FunctionCopy.Accessor(function: a, rewrites: a.instructions.filter { $0.groups.contains(.portIO) }
                .map { HotRewrite(address: $0.address, bytes: [0x90]) })
        }
        let plan = try FunctionCopyPlan.make(hot: [], in: image, at: 0xf0_0000, disassembler: d, promotions: promotions, accessors: hot)
        let copy = plan.copy
        #expect(copy.function.start == putchar.start && copy.accessors.map(\.start) == accessors.map(\.start))
        // The copy decodes whole (the rewritten accessor instructions are NOPs here).
        let all = d.decodeAll(copy.bytes, address: copy.address)
        #expect(all.reduce(0) { $0 + $1.length } == copy.bytes.count)
        for a in accessors {
            for i in a.instructions {
                let at = try #require(copy.copyAddress(of: i.address))
                #expect(copy.originalAddress(of: at) == i.address)
            }
            // The promoted calls call the accessors' copies.
            let entry = try #require(copy.copyAddress(of: a.start))
            #expect(all.contains { $0.mnemonic == "call" && $0.branch?.target == entry }, "\(a.symbol.name)'s copy is called")
        }
        // A return into the copy after a promoted call stands for that call.
        for p in promotions {
            let k = try #require(putchar.index(at: p.site))
            let pad = try #require(copy.copyAddress(of: putchar.instructions[k + 1].address))
            #expect(copy.originalCall(returningTo: pad) == p.site)
            let body = try #require(copy.copyAddress(of: p.site))
            #expect(copy.originalCall(returningTo: body + 1) == p.site)
        }
        // Entered by redirects on the way to the calls (putchar has no 5-byte entry and no direct caller).
        #expect(!plan.entries.isEmpty && plan.entries.allSatisfy { $0.kind == .redirect }, "\(plan.entries.map(\.kind)) \(plan.entryRefusals)")
        for e in plan.entries { try expectBranchWrite(e.writes[0], to: e.target, d) }
        // The guest's bytes it was made from: putchar, both accessors, and at -Os the serial_out thunk.
        #expect(copy.sources.count == (name.hasSuffix("Os") ? 4 : 3))
        #expect(copy.evictionWrites.count == copy.pieces.filter { $0.kind == .pad }.count)
    }

    @Test("c-consoleops-cpl3-noalign: kprintf's calls through ops->putc promoted to a copy of uart_putc that keeps its own promoted call to uart_ready (one level up): the copy decodes whole, each promoted call calls its accessor's copy, returns map back, the nested promotions are found")
    func nestedPromotion() throws {
        let image = try CGuestCopyTests.image("c-consoleops-cpl3-noalign")
        let d = try X86Disassembler()
        let kprintf = try decoded("kprintf", image, d)
        // The C's static uart_putc (start.s has a uart_putc of its own, the shorter one).
        let putcSymbol = try #require(image.symbols.symbols.filter { $0.name == "uart_putc" && $0.size > 0 }.max { $0.size < $1.size })
        let putc = try image.decode(putcSymbol, disassembler: d), ready = try decoded("uart_ready", image, d)
        // Its one 5-byte instruction before the poll loop is on the '\n' branch, before its recursive call.
        #expect(putc.instructions.filter { $0.length >= 5 && $0.mnemonic != "nop" }.map(\.description)
                    == ["add qword ptr [rbx + 0x10], 1", "imul ebp, ebp, 0x1000193", "mov esi, 0xd", "call 0x\(String(putc.start, radix: 16))"],
                "\(putc.instructions.map(\.description))")
        let putcCalls = kprintf.instructions.filter { $0.description == "call qword ptr [rax]" }
        #expect(putcCalls.count == 2, "\(kprintf.instructions.filter { $0.groups.contains(.call) }.map(\.description))")
        let outer = try CallPromotion.make(call: putcCalls[0], caller: kprintf, accessor: putc.start, in: image, disassembler: d)
        let others = outer.samePointerCalls(in: kprintf, image: image, disassembler: d)
        #expect(others.map(\.site) == [putcCalls[1].address])
        let readyCall = try #require(putc.instructions.first { $0.description == "call qword ptr [rax + 0x18]" })
        let inner = try CallPromotion.make(call: readyCall, caller: putc, accessor: ready.start, in: image, disassembler: d)
        let promotions = [outer] + others + [inner]
        let hot = [putc, ready].map { a in
            FunctionCopy.Accessor(function: a, rewrites: a.instructions.filter { $0.groups.contains(.portIO) }
                .map { HotRewrite(address: $0.address, bytes: [0x90]) })
        }
        let plan = try FunctionCopyPlan.make(hot: [], in: image, at: 0xf0_0000, disassembler: d, promotions: promotions, accessors: hot)
        let copy = plan.copy
        #expect(copy.function.start == kprintf.start && copy.accessors.map(\.start) == [putc.start, ready.start])
        // The code decodes whole (kprintf's jump table snapshot follows it).
        let codeEnd = Int(try #require(copy.pieces.map(\.copy.upperBound).max()) - copy.address)
        let all = d.decodeAll(Array(copy.bytes[..<codeEnd]), address: copy.address)
        #expect(all.reduce(0) { $0 + $1.length } == codeEnd)
        // kprintf's promoted calls call uart_putc's copy; uart_putc's copy calls uart_ready's, and its recursive call its own start.
        let putcEntry = try #require(copy.copyAddress(of: putc.start)), readyEntry = try #require(copy.copyAddress(of: ready.start))
        let calls = all.filter { $0.mnemonic == "call" }
        #expect(calls.filter { $0.branch?.target == putcEntry && kprintf.contains(copy.originalAddress(of: $0.address) ?? 0) }.count == 2)
        #expect(calls.contains { $0.branch?.target == readyEntry && putc.contains(copy.originalAddress(of: $0.address) ?? 0) })
        #expect(calls.contains { $0.branch?.target == putcEntry && putc.contains(copy.originalAddress(of: $0.address) ?? 0) },
                "the recursive call stays in the copy")
        // A return after the nested promoted call stands for uart_putc's call.
        let k = try #require(putc.index(at: readyCall.address))
        let pad = try #require(copy.copyAddress(of: putc.instructions[k + 1].address))
        #expect(copy.originalCall(returningTo: pad) == readyCall.address)
        // The nested promotions of uart_putc's copy: uart_ready's call, with uart_putc and uart_ready to copy.
        let nested = CallPromotion.nested(in: copy, from: putc.start)
        #expect(nested.promotions == [inner] && nested.functions.map(\.start) == [putc.start, ready.start])
        #expect(CallPromotion.nested(in: copy, from: ready.start).promotions.isEmpty)
        // Entered at kprintf's start (main calls it directly), not at the accessors' promoted call.
        #expect(plan.entries.contains { $0.kind == .callSite }, "\(plan.entries.map(\.kind)) \(plan.entryRefusals)")
        // A promoted call naming an accessor that is not copied is refused.
        #expect(throws: DMPRefusal.self) {
            try FunctionCopy(kprintf, at: 0xf0_0000, promotions: [outer, inner], accessors: [hot[0]])
        }
    }
}

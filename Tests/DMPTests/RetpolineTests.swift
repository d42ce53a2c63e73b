@testable import DMP
import Testing
import VMMKit
import X86Disassembler

/// Code built with retpolines (gcc `-mindirect-branch=thunk-extern -mfunction-return=thunk-extern`, Linux's
/// thunks): ``BranchThunk`` recognises the thunks by their code, a function ending in a jump to the return thunk
/// returns, and calls through register thunks and load thunks are promoted (``CallPromotion``).
@Suite("Retpolines")
struct RetpolineTests {
    /// `bytes` decoded as a sized function `name` at `address`.
    func function(_ bytes: [UInt8], at address: UInt64 = 0x1000, name: String = "f", _ d: X86Disassembler) throws -> DecodedFunction {
        try DecodedFunction.decode(GuestSymbol(name: name, address: address, size: UInt64(bytes.count), isFunction: true),
                                   bytes: bytes, disassembler: d)
    }

    /// Linux's retpoline thunk for `reg` (number 0-15): `call 1f; 2: pause; lfence; jmp 2b; int3...; 1: mov [rsp], reg; ret; int3`.
    static func retpoline(_ reg: UInt8, movDisplacement: UInt8? = nil) -> [UInt8] {
        let rex: UInt8 = 0x48 | (reg >= 8 ? 0x04 : 0)
        let mov: [UInt8] = movDisplacement.map { [rex, 0x89, 0x44 | ((reg & 7) << 3), 0x24, $0] } ?? [rex, 0x89, 0x04 | ((reg & 7) << 3), 0x24]
        // call +7 (over pause, lfence, jmp back: 2 + 3 + 2 bytes)
        return [0xe8, 0x07, 0, 0, 0, 0xf3, 0x90, 0x0f, 0xae, 0xe8, 0xeb, 0xf9] + mov + [0xc3, 0xcc]
    }

    @Test("register thunks: jmp r64, lfence; jmp r64, the retpoline (also after endbr64); not a retpoline that writes above the return address, not jmp [m], not jmp rsp")
    func registerThunks() throws {
        let d = try X86Disassembler()
        #expect(BranchThunk.register(of: try function([0xff, 0xe0], d)) == .rax)                 // jmp rax
        #expect(BranchThunk.register(of: try function([0x0f, 0xae, 0xe8, 0x41, 0xff, 0xe3], d)) == .r11) // lfence; jmp r11
        #expect(BranchThunk.register(of: try function(Self.retpoline(0), d)) == .rax)
        #expect(BranchThunk.register(of: try function(Self.retpoline(12), d)) == .r12)
        #expect(BranchThunk.register(of: try function([0xf3, 0x0f, 0x1e, 0xfa] + Self.retpoline(6), d)) == .rsi)
        #expect(BranchThunk.register(of: try function(Self.retpoline(0, movDisplacement: 8), d)) == nil, "mov [rsp+8], rax; ret returns elsewhere")
        #expect(BranchThunk.register(of: try function([0xff, 0x67, 0x08], d)) == nil)               // jmp [rdi + 8]
        #expect(BranchThunk.register(of: try function([0xff, 0xe4], d)) == nil)                     // jmp rsp
        #expect(BranchThunk.register(of: try function([0xc3], d)) == nil)
        // None is a return thunk.
        #expect(!BranchThunk.isReturn(try function(Self.retpoline(0), d)))
    }

    @Test("return thunks: ret (ret; int3), the retpoline return (call; trap; lea rsp, [rsp + 8]; ret); not ret 8, not a bnd ret, not lea rsp, [rsp + 16]")
    func returnThunks() throws {
        let d = try X86Disassembler()
        #expect(BranchThunk.isReturn(try function([0xc3, 0xcc], d)))
        #expect(BranchThunk.isReturn(try function([0xf3, 0x0f, 0x1e, 0xfa, 0xc3], d)))
        let trap: [UInt8] = [0xe8, 0x07, 0, 0, 0, 0xf3, 0x90, 0x0f, 0xae, 0xe8, 0xeb, 0xf9]
        #expect(BranchThunk.isReturn(try function(trap + [0x48, 0x8d, 0x64, 0x24, 0x08, 0xc3], d)))
        #expect(!BranchThunk.isReturn(try function(trap + [0x48, 0x8d, 0x64, 0x24, 0x10, 0xc3], d)))
        #expect(!BranchThunk.isReturn(try function([0xc2, 0x08, 0x00], d)))   // ret 8
        #expect(!BranchThunk.isReturn(try function([0xf2, 0xc3], d)))         // bnd ret
        #expect(!BranchThunk.isReturn(try function([0x90, 0xc3], d)))
    }

    @Test("an indirect tail jump in retpoline code (jmp rel32 to a register thunk, nothing pushed) is promoted as jmp r64, the thunk's bytes guarded; not with a frame pushed, not a jump to anything else")
    func tailJumpThroughThunk() throws {
        let d = try X86Disassembler()
        let thunkBytes = Self.retpoline(0)
        let thunk = GuestSymbol(name: "__x86_indirect_thunk_rax", address: 0x2000, size: UInt64(thunkBytes.count), isFunction: true)
        // f: push rbx; pop rbx; jmp 0x2000      g: push rbx; jmp 0x2000      h: jmp 0x3000 (a plain function)
        let f: [UInt8] = [0x53, 0x5b, 0xe9, 0xf9, 0x0f, 0, 0], g: [UInt8] = [0x53, 0xe9, 0xfa, 0x0e, 0, 0]
        let h: [UInt8] = [0xe9, 0xfb, 0x1d, 0, 0]
        let image = CodeImage(regions: [.init(address: 0x1000, bytes: f), .init(address: 0x1100, bytes: g), .init(address: 0x1200, bytes: h),
                                        .init(address: 0x2000, bytes: thunkBytes), .init(address: 0x3000, bytes: [0xc3])],
                              symbols: SymbolTable([GuestSymbol(name: "f", address: 0x1000, size: 7, isFunction: true),
                                                    GuestSymbol(name: "g", address: 0x1100, size: 6, isFunction: true),
                                                    GuestSymbol(name: "h", address: 0x1200, size: 5, isFunction: true), thunk,
                                                    GuestSymbol(name: "plain", address: 0x3000, size: 1, isFunction: true)]))
        let tails = CallPromotion.tailJumps(in: try function(f, d), to: 0x4000, image: image, disassembler: d)
        #expect(tails.map(\.site) == [0x1002] && tails.first?.target == .register(.rax))
        #expect(tails.first?.thunks == [CodeImage.Region(address: 0x2000, bytes: Array(thunkBytes.dropLast()))], "from its start to its ret")
        #expect(CallPromotion.tailJumps(in: try function(g, at: 0x1100, d), to: 0x4000, image: image, disassembler: d).isEmpty)
        #expect(CallPromotion.tailJumps(in: try function(h, at: 0x1200, d), to: 0x4000, image: image, disassembler: d).isEmpty)
        // Emitted as a guarded jump: below the red zone, compare, the original jmp rel32 (refitted) on a miss.
        let jump = try #require(try function(f, d).instructions.last)
        var a = X86Assembler(origin: 0x30_0000)
        try CallPromotion.emit(try #require(tails.first), call: jump, entries: [.absolute(0x30_1000)], into: &a)
        let i = d.decodeAll(try a.finish(), address: 0x30_0000)
        #expect(i.map(\.description).first == "lea rsp, [rsp - 0x80]", "\(i.map(\.description))")
        #expect(i.contains { $0.mnemonic == "jmp" && $0.branch?.target == 0x2000 }, "the miss path jumps to the thunk")
        #expect(i.contains { $0.mnemonic == "jmp" && $0.branch?.target == 0x30_1000 }, "the hit path jumps to the copy")
        #expect(!i.contains { $0.mnemonic == "call" })
    }

    @Test("c-uart-cpl3-retpoline-Os: serial_in is called through call __x86_indirect_thunk_rax (promoted as call rax), serial_out through a load thunk (mov rax, [rdi + 0x18]; jmp __x86_indirect_thunk_rax: promoted as call [rdi + 0x18] that sets rax to the accessor on a hit)")
    func osRetpolineCallers() throws {
        let image = try CGuestCopyTests.image("c-uart-cpl3-retpoline-Os")
        let d = try X86Disassembler()
        func decoded(_ name: String) throws -> DecodedFunction {
            try image.decode(try #require(image.symbols.symbols.first { $0.name == name && $0.size > 0 }), disassembler: d)
        }
        let putchar = try decoded("serial8250_console_putchar")
        let inSlow = try decoded("io_serial_in_slow"), outSlow = try decoded("io_serial_out_slow")
        let raxThunk = try decoded("__x86_indirect_thunk_rax"), serialOut = try decoded("serial_out")
        let calls = putchar.instructions.filter { $0.groups.contains(.call) }
        #expect(calls.map { $0.branch?.target } == [raxThunk.start, serialOut.start], "\(calls.map(\.description))")
        let pIn = try CallPromotion.make(call: calls[0], caller: putchar, accessor: inSlow.start, in: image, disassembler: d)
        #expect(pIn.target == .register(.rax) && pIn.loads == nil && pIn.thunks.map(\.address) == [raxThunk.start])
        let pOut = try CallPromotion.make(call: calls[1], caller: putchar, accessor: outSlow.start, in: image, disassembler: d)
        #expect(pOut.target == .memory(.init(base: .rdi, displacement: 0x18)) && pOut.loads == .rax)
        #expect(pOut.thunks.map(\.address) == [serialOut.start, raxThunk.start])
        // The load thunk's hit path sets rax to the accessor, as the thunk would have; nothing writes a flag.
        var a = X86Assembler(origin: 0x30_0000)
        try CallPromotion.emit(pOut, call: calls[1], entries: [.absolute(0x30_1000)], into: &a)
        let i = d.decodeAll(try a.finish(), address: 0x30_0000)
        let hit = try #require(i.lastIndex { $0.mnemonic == "pop" })
        #expect(i[hit + 1].description == "mov eax, 0x\(String(outSlow.start, radix: 16))", "\(i.map(\.description))")
        #expect(i[hit + 2].mnemonic == "call" && i[hit + 2].branch?.target == 0x30_1000)
        #expect(i.allSatisfy { $0.flagsWritten.isEmpty })
        // The caller's copy with both promoted: whole, calling both accessors' copies, its sources all four functions.
        let hot = [inSlow, outSlow].map { a in
            FunctionCopy.Accessor(function: a, rewrites: a.instructions.filter { $0.groups.contains(.portIO) }
                .map { HotRewrite(address: $0.address, bytes: [0x90]) })
        }
        let plan = try FunctionCopyPlan.make(hot: [], in: image, at: 0xf0_0000, disassembler: d, promotions: [pIn, pOut], accessors: hot)
        let all = d.decodeAll(plan.copy.bytes, address: plan.copy.address)
        #expect(all.reduce(0) { $0 + $1.length } == plan.copy.bytes.count)
        for f in [inSlow, outSlow] {
            let entry = try #require(plan.copy.copyAddress(of: f.start))
            #expect(all.contains { $0.mnemonic == "call" && $0.branch?.target == entry })
        }
        #expect(Set(plan.copy.sources.map(\.address)) == [putchar.start, inSlow.start, outSlow.start, serialOut.start, raxThunk.start])
        #expect(!plan.entries.isEmpty, "\(plan.entryRefusals)")
    }

    @Test("c-portops-cpl3-retpoline-inline: gcc's own thunk has no symbol size; a call of it is still promoted as call rax, the thunk's bytes read from its start to its ret")
    func unsizedThunk() throws {
        let image = try CGuestCopyTests.image("c-portops-cpl3-retpoline-inline")
        let d = try X86Disassembler()
        let symbol = try #require(image.symbols.symbols.first { $0.name == "__x86_indirect_thunk_rax" })
        #expect(symbol.size == 0)
        let caller = try image.decode(try #require(image.symbols.symbols.first { $0.name == "serial_puts_fast.constprop.0" }), disassembler: d)
        let call = try #require(caller.instructions.first { $0.groups.contains(.call) && $0.branch?.target == symbol.address })
        let out = try #require(image.symbols.symbols.first { $0.name == "io_serial_out" && $0.size > 0 })
        let p = try CallPromotion.make(call: call, caller: caller, accessor: out.address, in: image, disassembler: d)
        #expect(p.target == .register(.rax) && p.loads == nil)
        let thunk = try #require(p.thunk)
        #expect(thunk.address == symbol.address && thunk.bytes.first == 0xe8 && thunk.bytes.last == 0xc3, "\(thunk.bytes)")
        #expect(image.bytes(at: thunk.address, count: thunk.bytes.count) == thunk.bytes)
    }

    @Test("c-freebsd-cpl3-retpoline: ns8250_putc ends in jmp __x86_return_thunk, so it returns: its copy is entered through its entry block's 5-byte instructions (run on every call), not only through redirects on the DELAY path")
    func returnThunkFunctionReturns() throws {
        let image = try CGuestCopyTests.image("c-freebsd-cpl3-retpoline")
        let d = try X86Disassembler()
        let putc = try image.decode(try #require(image.symbols.symbols.first { $0.name == "ns8250_putc" && $0.size > 0 }), disassembler: d)
        #expect(!putc.instructions.contains { $0.groups.contains(.return) })
        let last = try #require(putc.instructions.last { $0.mnemonic == "jmp" && !putc.contains($0.branch?.target ?? 0) })
        #expect(BranchThunk.isReturnJump(last, in: image, disassembler: d))
        let hot = putc.instructions.filter { $0.groups.contains(.portIO) }.map { HotRewrite(address: $0.address, bytes: [0x90]) }
        #expect(hot.count == 3)
        let plan = try FunctionCopyPlan.make(hot: hot, in: image, at: 0xf0_0000, disassembler: d)
        // The entry block: from the first instruction to the loop head (the first branch target).
        let head = try #require(putc.loopHeads.min())
        #expect(plan.entries.contains { $0.kind == .redirect && $0.site < head }, "\(plan.entries.map { ($0.kind, putc.location($0.site)) })")
    }
}

@testable import DMP
import Testing
import VMMKit
import X86Disassembler

/// Checks that an entry's writes are one instruction each: the replacement decodes as one branch to `target`
/// followed by NOPs filling the original instruction's length exactly.
func expectBranchWrite(_ w: PatchWrite, to target: UInt64, _ d: X86Disassembler, mnemonic: String = "jmp",
                       sourceLocation: SourceLocation = #_sourceLocation) throws {
    #expect(w.replacement.count == w.original.count, sourceLocation: sourceLocation)
    let all = d.decodeAll(w.replacement, address: w.address)
    #expect(all.first?.mnemonic == mnemonic && all.first?.branch?.target == target, "\(all.first.map { "\($0)" } ?? "nothing")", sourceLocation: sourceLocation)
    #expect(all.dropFirst().allSatisfy { $0.mnemonic == "nop" }, sourceLocation: sourceLocation)
    #expect(all.reduce(0) { $0 + $1.length } == w.replacement.count, sourceLocation: sourceLocation)
}

@Suite("Function copy: entries")
struct CopyEntryTests {
    @Test("the entry instruction: the first of 5 bytes or more, or the one after endbr64")
    func functionEntry() throws {
        let d = try X86Disassembler()
        let copy = try FunctionCopy(try decodeFixture("rip_data", d), at: copyPlacement)
        let e = try copy.functionEntry()
        #expect(e.kind == .functionEntry && e.site == 0x401230 && e.target == copyPlacement && e.writes.count == 1)
        #expect(e.writes[0].original == Array(CopyFixtures.text.bytes[0x230..<0x236]))
        try expectBranchWrite(e.writes[0], to: copyPlacement, d)

        let cet = try FunctionCopy(try decodeFixture("cet_load", d), at: copyPlacement)
        let ce = try cet.functionEntry()
        #expect(ce.site == 0x4013e4, "endbr64 stays; the mov after it becomes the jump")
        #expect(ce.target == copyPlacement + 4)
        try expectBranchWrite(ce.writes[0], to: copyPlacement + 4, d)

        let uart = try FunctionCopy(try decodeFixture("uart_puts", d), at: copyPlacement)
        #expect(try #require(throws: DMPRefusal.self) { try uart.functionEntry() }.reason.contains("is 3 bytes"))
    }

    @Test("a loop in a function that never returns is entered through a 5-byte instruction in it, at the same point")
    func loopRedirect() throws {
        let d = try X86Disassembler()
        let f = try decodeFixture("run_forever", d)
        let hot: UInt64 = 0x40130a // out dx, al
        let copy = try FunctionCopy(f, at: copyPlacement, rewrites: [HotRewrite(address: hot, bytes: [0x90])])
        let entries = copy.pathEntries(for: hot)
        #expect(entries.map(\.site) == [0x401303], "the call to helper before it in its block (the back-edge is a 2-byte jmp)")
        let e = try #require(entries.first)
        #expect(e.kind == .redirect && e.target == copy.copyAddress(of: 0x401303))
        try expectBranchWrite(e.writes[0], to: e.target, d)
        #expect(copy.pathEntries(for: 0x4012f0).map(\.site) == [0x4012f1, 0x4012fb, 0x401303], "after the push, down to the loop's jmp")
        #expect(copy.pathEntries(for: 0x4012f0, limit: 1).count == 1)
        #expect(try #require(throws: DMPRefusal.self) { try copy.redirect(at: 0x401300) }.reason.contains("is 3 bytes"))
        #expect(try #require(throws: DMPRefusal.self) { try copy.redirect(at: 0x401301) }.reason.contains("not an instruction start"))
    }

    @Test("loops of short instructions only (gcc -Os): the instructions of 5 bytes or more before the loops are a way in, nearest first")
    func pathEntriesBeforeShortLoops() throws {
        let d = try X86Disassembler()
        // Guests/c-poll-cpl3-Os's poll_console_write: an outer loop over the bytes, an inner LSR poll, every
        // instruction in them of 2 to 4 bytes but the two 1-byte port accesses; the port loads before them.
        let code: [UInt8] = [
            0x89, 0xd7, 0x31, 0xc9,                     // 0x00 mov edi, edx; xor ecx, ecx
            0x41, 0xb8, 0xfd, 0x03, 0x00, 0x00,         // 0x04 mov r8d, 0x3fd
            0x41, 0xb9, 0xf8, 0x03, 0x00, 0x00,         // 0x0a mov r9d, 0x3f8
            0x48, 0x39, 0xf9, 0x74, 0x14,               // 0x10 cmp rcx, rdi; je 0x29
            0x44, 0x89, 0xc2, 0xec, 0xa8, 0x20, 0x74, 0xf8, // 0x15 mov edx, r8d; in al, dx; test al, 0x20; je 0x15
            0x8a, 0x04, 0x0e, 0x44, 0x89, 0xca, 0xee,   // 0x1d mov al, [rsi + rcx]; mov edx, r9d; out dx, al
            0x48, 0xff, 0xc1, 0xeb, 0xe7, 0xc3,         // 0x24 inc rcx; jmp 0x10; ret
        ]
        let base: UInt64 = 0x10_141a
        let (image, s) = handMade(code, at: base, name: "poll_console_write")
        let copy = try FunctionCopy(try image.decode(s, disassembler: d), at: copyPlacement)
        for hot in [base + 0x18, base + 0x23] { // in al, dx; out dx, al
            #expect(copy.pathEntries(for: hot).isEmpty, "no instruction of 5 bytes or more in the loops")
            let entries = copy.entriesBeforeLoops(for: hot)
            #expect(entries.map(\.site) == [base + 0x0a, base + 0x04], "the port loads, nearest first")
            #expect(entries.allSatisfy { $0.kind == .redirect && $0.target == copy.copyAddress(of: $0.site) })
            for e in entries { try expectBranchWrite(e.writes[0], to: e.target, d) }
            #expect(PatchPlanner.reachable(in: copy.function, from: entries.map(\.site)).contains(hot))
        }
    }

    @Test("a hot loop the redirects found for a sibling further down do not lead to: the instructions of 5 bytes or more before its loop are a way in too")
    func entriesBeforeLoopsForAnUnreachedPath() throws {
        let d = try X86Disassembler()
        // Guests/c-printf-cpl3's sink_out, shortened: a 3-byte first instruction, the LSR poll loop of short
        // instructions, the THR write after it; reached only through a tail jump, no padding. The THR write's
        // path holds the 5-byte `mov edx, 0x3f8` after the loop, which does not lead back into the poll.
        let code: [UInt8] = [
            0x8b, 0x46, 0x04, 0x89, 0xf9,               // 0x00 mov eax, [rsi + 4]; mov ecx, edi
            0xba, 0xfd, 0x03, 0x00, 0x00,               // 0x05 mov edx, 0x3fd
            0xec, 0xa8, 0x20, 0x74, 0xfb,               // 0x0a in al, dx; test al, 0x20; je 0x0a
            0xba, 0xf8, 0x03, 0x00, 0x00,               // 0x0f mov edx, 0x3f8
            0x89, 0xc8, 0xee, 0x89, 0x46, 0x04, 0xc3,   // 0x14 mov eax, ecx; out dx, al; mov [rsi + 4], eax; ret
        ]
        let base: UInt64 = 0x10_2400
        let (image, _) = handMade(code, at: base, name: "sink_out")
        let plan = try FunctionCopyPlan.make(hot: [HotRewrite(address: base + 0x0a, bytes: [0x90]), HotRewrite(address: base + 0x16, bytes: [0x90])],
                                             in: image, at: copyPlacement, disassembler: d)
        #expect(plan.entries.map(\.site) == [base + 0x0f, base + 0x05], "the redirect after the loop, then the port load before it")
        #expect(plan.entries.allSatisfy { $0.kind == .redirect })
        let reached = PatchPlanner.reachable(in: plan.copy.function, from: plan.entries.map(\.site))
        #expect(reached.contains(base + 0x0a) && reached.contains(base + 0x16))
        // The THR write alone: its redirect leads to it; the port load before the loop comes in as the entry
        // block's (entryBlockEntries), not for want of a way to the write.
        let out = try FunctionCopyPlan.make(hot: [HotRewrite(address: base + 0x16, bytes: [0x90])], in: image, at: copyPlacement, disassembler: d)
        #expect(out.entries.map(\.site) == [base + 0x0f, base + 0x05])
        #expect(!out.entryRefusals.contains { $0.reason.contains("before the hot loops") })
    }

    /// Guests/c-freebsd-cpl3-noalign's ns8250_putc, shortened: the THRE read laid out after the loop's body, whose
    /// only 5-byte instruction lies on the DELAY path (taken only while THRE is clear); a 3-byte first instruction, no
    /// padding, no direct caller. `ending`: what follows the data write at 0x2d (`ret`, or a tail call).
    static func shortenedPutc(ending: [UInt8]) -> [UInt8] {
        [
            0x41, 0x89, 0xf2,                           // 0x00 mov r10d, esi
            0xbe, 0x90, 0xd0, 0x03, 0x00,               // 0x03 mov esi, 0x3d090
            0xba, 0xfd, 0x03, 0x00, 0x00, 0xeb, 0x10,   // 0x08 mov edx, 0x3fd (the loop's head); jmp 0x1f
            0x83, 0xee, 0x01, 0x74, 0x10,               // 0x0f sub esi, 1; je 0x24
            0x48, 0x8b, 0x05, 0x00, 0x10, 0x00, 0x00,   // 0x14 mov rax, [rip + 0x1000] (DELAY)
            0xf3, 0x90, 0xeb, 0xe9,                     // 0x1b pause; jmp 0x08
            0xec, 0xa8, 0x20, 0x74, 0xeb,               // 0x1f in al, dx; test al, 0x20; je 0x0f
            0x44, 0x89, 0xd0, 0xba, 0xf8, 0x03, 0x00, 0x00, 0xee, // 0x24 mov eax, r10d; mov edx, 0x3f8; out dx, al
        ] + ending
    }

    @Test("a function that returns with no way in at its start is entered through its entry block too: the paths' redirects may lie on a path that never runs")
    func entryBlockEntries() throws {
        let d = try X86Disassembler()
        let base: UInt64 = 0x10_1708
        let (image, _) = handMade(Self.shortenedPutc(ending: [0xc3]), at: base, name: "ns8250_putc") // ret
        let copy = try FunctionCopy(try image.decode(image.symbols.symbols[0], disassembler: d), at: copyPlacement)
        #expect(copy.entryBlockEntries().map(\.site) == [base + 0x03], "up to the loop's head, a branch target")
        let plan = try FunctionCopyPlan.make(hot: [HotRewrite(address: base + 0x1f, bytes: [0x90]), HotRewrite(address: base + 0x2c, bytes: [0x90])],
                                             in: image, at: copyPlacement, disassembler: d)
        #expect(plan.entries.map(\.site) == [base + 0x14, base + 0x27, base + 0x03], "the paths' redirects, then the entry block's")
        #expect(plan.entries.allSatisfy { $0.kind == .redirect })
        for e in plan.entries { try expectBranchWrite(e.writes[0], to: e.target, d) }
    }

    @Test("a function that leaves only through a tail call returns to its caller too: its entry block is a way in, as for one that ends in ret")
    func tailCallReturnsToCaller() throws {
        let d = try X86Disassembler()
        // The shortened ns8250_putc, ending in a tail call (jmp rel32 to another function: OpenBSD's comcnputc ends
        // in gcc's `jmp splx`) instead of ret.
        let base: UInt64 = 0x10_1708
        let (image, _) = handMade(Self.shortenedPutc(ending: [0xe9, 0xd3, 0x0f, 0x00, 0x00]), at: base, name: "comcnputc") // jmp base + 0x1005
        let copy = try FunctionCopy(try image.decode(image.symbols.symbols[0], disassembler: d), at: copyPlacement)
        #expect(copy.returnsToCaller)
        let plan = try FunctionCopyPlan.make(hot: [HotRewrite(address: base + 0x1f, bytes: [0x90]), HotRewrite(address: base + 0x2c, bytes: [0x90])],
                                             in: image, at: copyPlacement, disassembler: d)
        #expect(plan.entries.map(\.site) == [base + 0x14, base + 0x27, base + 0x2d, base + 0x03],
                "the paths' redirects (the tail call's jmp closes the write's block), then the entry block's")
        // A loop that never leaves, and an indirect jump that is no table's dispatch (a tail call through a pointer).
        let forever = try FunctionCopy(try decodeFixture("run_forever", d), at: copyPlacement)
        #expect(!forever.returnsToCaller)
        let (pointer, _) = handMade([0x48, 0x8b, 0x47, 0x18, 0xff, 0xe0], at: base, name: "tail") // mov rax, [rdi + 0x18]; jmp rax
        #expect(try FunctionCopy(try pointer.decode(pointer.symbols.symbols[0], disassembler: d), at: copyPlacement).returnsToCaller)

        // Guests/c-openbsd-cpl3-noalign's comcnputc: a 1-byte first instruction, reached through cn_tab->cn_putc, the
        // 5-byte instructions of its first TXRDY loop on the delay(1) path, `jmp splx` at its end.
        let guest = try CGuestCopyTests.image("c-openbsd-cpl3-noalign")
        let f = try guest.decode(try #require(guest.symbols.symbols.first { $0.name == "comcnputc" && $0.size > 0 }), disassembler: d)
        let io = f.instructions.filter { $0.groups.contains(.portIO) }
        #expect(io.count == 3 && !f.instructions.contains { $0.groups.contains(.return) })
        let firstJump = try #require(f.instructions.first { $0.groups.contains(.jump) })
        let comcnputc = try FunctionCopyPlan.make(hot: io.map { HotRewrite(address: $0.address, bytes: [0x90]) }, in: guest,
                                                  at: copyPlacement, disassembler: d)
        #expect(comcnputc.copy.returnsToCaller)
        #expect(comcnputc.entries.contains { $0.kind == .redirect && $0.site < firstJump.address },
                "\(comcnputc.entries.map { f.location($0.site) })")
    }

    @Test("direct call and tail-call sites to a function are found and retargeted to the copy")
    func callSites() throws {
        let d = try X86Disassembler()
        let helper = try decodeFixture("helper", d)
        let sites = fixtureImage.callSites(to: helper.start, disassembler: d)
        // calls (2), classify, run_forever, cet_switch (a call and a jmp rel32 tail call), tail (jmp rel32);
        // classify's `jmp helper` is a rel8 and cannot be retargeted.
        #expect(sites.map(\.address) == [0x4011b2, 0x4011f8, 0x401202, 0x401223, 0x401303, 0x401359, 0x401385])
        let copy = try FunctionCopy(helper, at: copyPlacement)
        for s in sites {
            let e = try copy.callSiteEntry(s)
            #expect(e.kind == (s.bytes[0] == 0xe8 ? .callSite : .tailCallSite) && e.target == copyPlacement)
            try expectBranchWrite(e.writes[0], to: copyPlacement, d, mnemonic: s.mnemonic)
            #expect(e.writes[0].original == s.bytes)
        }
        let notACall = try #require(try decodeFixture("calls", d).instructions.first { !$0.groups.contains(.call) })
        #expect(throws: DMPRefusal.self) { try copy.callSiteEntry(notACall) }
    }

    @Test("a call-site byte pattern inside another instruction, or in a function without a size, is not trusted")
    func callSiteDecoys() throws {
        let d = try X86Disassembler()
        let target: UInt64 = 0x50_0000
        func rel(_ site: UInt64) -> [UInt8] { Array(CopyEncoding.branch32(call: true, at: site, to: target)?.dropFirst() ?? []) }
        var code = [UInt8](repeating: 0xcc, count: 0x40)
        code[0] = 0xc3                                                                   // T: ret
        let decoy = [0x48, 0xb8, 0xe8] + rel(0x50_0012) + [0x00, 0x00, 0x00, 0xc3]      // D: mov rax, imm64 holding e8 rel32; ret
        code.replaceSubrange(0x10..<0x10 + decoy.count, with: decoy)
        code.replaceSubrange(0x20..<0x26, with: [0xe8] + rel(0x50_0020) + [0xc3])        // C: call T; ret
        code.replaceSubrange(0x30..<0x36, with: [0xe8] + rel(0x50_0030) + [0xc3])        // U (no size): call T; ret
        let image = CodeImage(regions: [.init(address: target, bytes: code)], symbols: SymbolTable([
            GuestSymbol(name: "T", address: target, size: 1, isFunction: true),
            GuestSymbol(name: "D", address: target + 0x10, size: UInt64(decoy.count), isFunction: true),
            GuestSymbol(name: "C", address: target + 0x20, size: 6, isFunction: true),
            GuestSymbol(name: "U", address: target + 0x30, size: 0, isFunction: true),
        ]))
        #expect(image.callSites(to: target, disassembler: d).map(\.address) == [target + 0x20])
    }

    @Test("post_delay: out 0x80 (2 bytes) becomes jmp rel8 to a jmp rel32 in the dead padding after the function")
    func deadPadding() throws {
        let d = try X86Disassembler()
        let hot: UInt64 = 0x4012a0
        let copy = try FunctionCopy(try decodeFixture("post_delay", d), at: copyPlacement, rewrites: [HotRewrite(address: hot, bytes: [0x90])])
        let e = try copy.deadPaddingEntry(hot: hot, in: fixtureImage, disassembler: d)
        #expect(e.kind == .deadPadding && e.site == hot && e.deadPadding == 0x4012aa..<0x4012af)
        #expect(e.target == copy.copyAddress(of: hot))
        #expect(e.writes.map(\.address) == [0x4012aa, hot], "the padding first, the instruction last")
        try expectBranchWrite(e.writes[1], to: 0x4012aa, d)
        #expect(e.writes[0].original == [0x66, 0x0f, 0x1f, 0x44, 0x00], "fill bytes")
        let pad = try d.decode(e.writes[0].replacement, address: 0x4012aa)
        #expect(pad.mnemonic == "jmp" && pad.length == 5 && pad.branch?.target == e.target)
        // Used padding is not handed out twice: the next slot, then padding further away, then none.
        let next = try copy.deadPaddingEntry(hot: hot, in: fixtureImage, disassembler: d, avoiding: [0x4012aa..<0x4012ab])
        #expect(next.deadPadding == 0x4012ab..<0x4012b0)
        let further = try copy.deadPaddingEntry(hot: hot, in: fixtureImage, disassembler: d, avoiding: [0x4012aa..<0x4012af])
        #expect(further.deadPadding == 0x4012e2..<0x4012e7, "after greet, the next function")
        let again = try #require(throws: DMPRefusal.self) {
            try copy.deadPaddingEntry(hot: hot, in: fixtureImage, disassembler: d, avoiding: [0x401000..<0x402000])  // every slot
        }
        #expect(again.reason.contains("no free 5-byte slot"))
        // Padding a patchable-entry table names is not dead.
        let named = CodeImage(regions: fixtureImage.regions, symbols: fixtureImage.symbols,
                              tables: [CodeAddressTable(name: "__patchable_function_entries", addresses: [0x4012ae])])
        #expect(try copy.deadPaddingEntry(hot: hot, in: named, disassembler: d).deadPadding == 0x4012e2..<0x4012e7)
        let elsewhere: [Range<UInt64>] = [0x401000..<0x4012aa, 0x4012b0..<0x402000]
        #expect(try #require(throws: DMPRefusal.self) { try copy.deadPaddingEntry(hot: hot, in: named, disassembler: d, avoiding: elsewhere) }
            .reason.contains("padding at 0x4012aa: named in __patchable_function_entries"))
        // endbr64 is never replaced (indirect branches must land on it).
        let cet = try FunctionCopy(try decodeFixture("cet_loop", d), at: copyPlacement)
        #expect(try #require(throws: DMPRefusal.self) { try cet.deadPaddingEntry(hot: cet.function.start, in: fixtureImage, disassembler: d) }
            .reason.contains("endbr64"))
        // A 1-byte hot instruction has no room for jmp rel8.
        let uart = try FunctionCopy(try decodeFixture("uart_puts", d), at: copyPlacement)
        #expect(try #require(throws: DMPRefusal.self) { try uart.deadPaddingEntry(hot: 0x4010d8, in: fixtureImage, disassembler: d) }
            .reason.contains("is 1 bytes"))
    }

    /// A function `f` at 0x500000 (`out 0x80, al` then `tail`), a gap of `gap`, then `g` of `gSize` bytes.
    static func paddingImage(tail: [UInt8], gap: [UInt8], gName: String = "g", gSize: UInt64 = 1) -> (CodeImage, FunctionCopy, X86Disassembler)? {
        let base: UInt64 = 0x50_0000
        let f = [0xe6, 0x80] + tail
        let code = f + gap + [0xc3]
        let image = CodeImage(regions: [.init(address: base, bytes: code)], symbols: SymbolTable([
            GuestSymbol(name: "f", address: base, size: UInt64(f.count), isFunction: true),
            GuestSymbol(name: gName, address: base + UInt64(f.count + gap.count), size: gSize, isFunction: true),
        ]))
        guard let d = try? X86Disassembler(), let sym = image.function(containing: base),
              let fn = try? image.decode(sym, disassembler: d), let copy = try? FunctionCopy(fn, at: copyPlacement) else { return nil }
        return (image, copy, d)
    }

    @Test("dead padding: fill bytes only, after ret/jmp/ud2, between two sized symbols, no CFI or patchable-entry preamble",
          arguments: [
              ([0xc3], [UInt8](repeating: 0xcc, count: 8), "g", 1, nil),
              ([0xc3], [UInt8](repeating: 0x00, count: 8), "g", 1, nil),
              ([0xeb, 0xfc], CopyEncoding.nops(7), "g", 1, nil),
              ([0xc3], [0xb8, 0x01, 0x00, 0x00, 0x00, 0x90, 0x90], "g", 1, "not all fill bytes"),
              ([0x90], CopyEncoding.nops(8), "g", 1, "can fall through"),
              ([0xc3], CopyEncoding.nops(8), "g", 0, "has no size"),
              ([0xc3], CopyEncoding.nops(8), "__pfx_g", 16, "preamble"),
              ([0xc3], CopyEncoding.nops(4), "g", 1, "no dead padding"),
          ] as [([UInt8], [UInt8], String, UInt64, String?)])
    func paddingRules(_ tail: [UInt8], _ gap: [UInt8], _ gName: String, _ gSize: UInt64, _ refusal: String?) throws {
        let (image, copy, d) = try #require(Self.paddingImage(tail: tail, gap: gap, gName: gName, gSize: gSize))
        if let refusal {
            let r = try #require(throws: DMPRefusal.self) { try copy.deadPaddingEntry(hot: 0x50_0000, in: image, disassembler: d) }
            #expect(r.reason.contains(refusal), "\(r.reason)")
        } else {
            let e = try copy.deadPaddingEntry(hot: 0x50_0000, in: image, disassembler: d)
            #expect(e.deadPadding?.lowerBound == 0x50_0002 + UInt64(tail.count))
        }
    }

    @Test("code at the bottom of the address space and a symbol size that wraps: refusals, no trap")
    func addressSpaceEnds() throws {
        let d = try X86Disassembler()
        // f at 0x10: out 0x80, al; ret; 8 bytes of int3; g, whose size runs past the top of the address space.
        let code: [UInt8] = [0xe6, 0x80, 0xc3] + [UInt8](repeating: 0xcc, count: 8) + [0xc3]
        let image = CodeImage(regions: [.init(address: 0x10, bytes: code)], symbols: SymbolTable([
            GuestSymbol(name: "f", address: 0x10, size: 3, isFunction: true),
            GuestSymbol(name: "g", address: 0x1b, size: UInt64.max - 4, isFunction: true),
            GuestSymbol(name: "h", address: UInt64.max - 8, size: 8, isFunction: true),
        ]))
        let f = try image.decode(try #require(image.function(containing: 0x10)), disassembler: d)
        let copy = try FunctionCopy(f, at: 0x1000, rewrites: [HotRewrite(address: 0x10, bytes: [0x90])])
        let e = try copy.deadPaddingEntry(hot: 0x10, in: image, disassembler: d)
        #expect(e.deadPadding == 0x13..<0x18)
        #expect(throws: DMPRefusal.self) { try copy.deadPaddingEntry(hot: 0x10, in: image, disassembler: d, avoiding: [0..<0x100]) }
        _ = try? FunctionCopyPlan.make(hot: [HotRewrite(address: 0x10, bytes: [0x90])], in: image, at: 0x1000, disassembler: d)
    }

    @Test("the plan gathers every entry the rules allow and refuses a copy nothing can enter")
    func plans() throws {
        let d = try X86Disassembler()
        let post = try FunctionCopyPlan.make(hot: [HotRewrite(address: 0x4012a0, bytes: [0x90])], in: fixtureImage, at: copyPlacement, disassembler: d)
        #expect(post.entries.map(\.kind) == [.entryThroughPadding, .deadPadding], "post_delay returns: its start first")
        #expect(post.entries[0].site == 0x401290 && post.entries[1].site == 0x4012a0)
        #expect(post.entries[0].deadPadding == 0x4012aa..<0x4012af && post.entries[1].deadPadding == 0x4012e2..<0x4012e7,
                "the second takes other padding")
        #expect(post.compatibleEntries.count == 2)
        #expect(post.entryRefusals.contains { $0.reason.contains("entry instruction of post_delay") })
        let postOnly = try FunctionCopyPlan.make(hot: [HotRewrite(address: 0x4012a0, bytes: [0x90])], in: fixtureImage, at: copyPlacement,
                                                 disassembler: d, entryThroughPadding: false)
        #expect(postOnly.entries.map(\.kind) == [.deadPadding] && postOnly.entries[0].deadPadding == 0x4012aa..<0x4012af)

        let forever = try FunctionCopyPlan.make(hot: [HotRewrite(address: 0x40130a, bytes: [0x90])], in: fixtureImage, at: copyPlacement, disassembler: d)
        #expect(forever.entries.map(\.kind) == [.redirect])

        let greet = try FunctionCopyPlan.make(hot: [HotRewrite(address: 0x4012d8, bytes: [0x90])], in: fixtureImage, at: copyPlacement, disassembler: d)
        #expect(greet.entries.first?.kind == .functionEntry && greet.entries.first?.site == 0x4012b0)

        let helper = try FunctionCopyPlan.make(hot: [HotRewrite(address: 0x401130, bytes: [0x90])], in: fixtureImage, at: copyPlacement, disassembler: d)
        #expect(Set(helper.entries.map(\.kind)) == [.functionEntry, .callSite, .tailCallSite])
        #expect(helper.entries.count == 8)
        #expect(helper.compatibleEntries == helper.entries, "every entry changes bytes of its own")
        var overlapping = helper
        let first = try #require(helper.entries.first)
        var clash = first
        clash.site += 2
        clash.writes = [PatchWrite(address: first.site + 2, original: [0, 0, 0, 0, 0], replacement: [0x90, 0x90, 0x90, 0x90, 0x90])]
        overlapping.entries.insert(clash, at: 1)
        #expect(overlapping.compatibleEntries == helper.entries, "an entry over bytes an earlier one writes is left out")

        // uart_puts: a 3-byte entry instruction, a 1-byte hot out, no direct caller: only the entry through
        // the padding after its own ret; without that tactic, the 5-byte instructions before its loops (its
        // next call enters there), nearest first.
        let uart = try FunctionCopyPlan.make(hot: [HotRewrite(address: 0x4010d8, bytes: [0x90])], in: fixtureImage, at: copyPlacement, disassembler: d)
        #expect(uart.entries.map(\.kind) == [.entryThroughPadding] && uart.entries[0].site == 0x4010b0)
        #expect(uart.entries[0].target == uart.copy.address)
        let before = try FunctionCopyPlan.make(hot: [HotRewrite(address: 0x4010d8, bytes: [0x90])], in: fixtureImage, at: copyPlacement,
                                               disassembler: d, entryThroughPadding: false)
        #expect(before.entries.map(\.kind) == [.redirect, .redirect] && before.entries.map(\.site) == [0x4010c3, 0x4010bd])
        #expect(before.entryRefusals.contains { $0.reason.contains("no direct call or tail call of uart_puts") })
        // A 2-byte first instruction, a loop of short instructions and nothing of 5 bytes before it, no caller, no padding: no way in.
        let (poll, _) = handMade([0x89, 0xfa, 0xec, 0xa8, 0x20, 0x74, 0xfb, 0xc3], name: "poll") // mov edx, edi; in; test; je; ret
        let noWay = try #require(throws: DMPRefusal.self) {
            try FunctionCopyPlan.make(hot: [HotRewrite(address: 0x40_0002, bytes: [0x90])], in: poll, at: copyPlacement, disassembler: d)
        }
        #expect(noWay.reason.hasPrefix("no way into the copy of poll"))
        #expect(noWay.reason.contains("no direct call or tail call of poll"))
        #expect(noWay.reason.contains("no instruction of 5 bytes or more before the hot loops"))
        let two = try #require(throws: DMPRefusal.self) {
            try FunctionCopyPlan.make(hot: [HotRewrite(address: 0x4010d8, bytes: [0x90]), HotRewrite(address: 0x4012a0, bytes: [0x90])],
                                      in: fixtureImage, at: copyPlacement, disassembler: d)
        }
        #expect(two.reason.contains("more than one function"))
        let none = try #require(throws: DMPRefusal.self) {
            try FunctionCopyPlan.make(hot: [HotRewrite(address: 0x30_0000, bytes: [0x90])], in: fixtureImage, at: copyPlacement, disassembler: d)
        }
        #expect(none.reason.contains("no sized function symbol"))
    }
}

@testable import DMP
import Testing
import VMMKit
import X86Disassembler

/// The function-copy planner on the C guests (`Guests/c-*.c`, gcc -O2, committed images): what each port
/// I/O instruction's copy would be entered through. No KVM: the images' text and symbols only.
@Suite("Function copy on the C guests")
struct CGuestCopyTests {
    static func image(_ name: String) throws -> CodeImage {
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3) // Tests/DMPTests/CGuestCopyTests.swift
        let bytes = try ImageFile.read(parts.joined(separator: "/") + "/Guests/\(name).elf")
        let elf = try ELFImage(bytes: bytes)
        let regions = elf.segments.filter(\.executable).map { s in
            CodeImage.Region(address: s.virtualAddress, bytes: Array(bytes[Int(s.fileOffset)..<Int(s.fileOffset + s.fileSize)]))
        }
        return CodeImage(regions: regions, symbols: elf.symbols)
    }

    @Test("every port I/O instruction in a 64-bit function gets a copy and a way into it",
          arguments: ["c-uart-cpl3", "c-doorbell-cpl3", "c-selfmod-cpl3"])
    func portIO(_ name: String) throws {
        let image = try Self.image(name)
        let d = try X86Disassembler()
        var planned: [String: CopyEntry.Kind] = [:]
        for s in image.symbols.symbols where s.isFunction && s.size > 0 {
            guard let f = try? image.decode(s, disassembler: d) else {
                #expect(s.name == "pvh_start32", "only the 32-bit PVH entry does not decode as 64-bit code")
                continue
            }
            for i in f.instructions where i.groups.contains(.portIO) && !i.groups.contains(.string) {
                let plan = try FunctionCopyPlan.make(hot: [HotRewrite(address: i.address, bytes: [0x90])], in: image,
                                                     at: 0xf0_0000, disassembler: d)
                planned[f.location(i.address)] = try #require(plan.entries.first).kind
            }
        }
        // The UART's port accessors are reached only through function pointers, start with 2- or 3-byte
        // instructions and hold 1-byte `in`/`out`: only the entry through dead padding leads into their copies.
        for accessor in ["io_serial_in+0x5", "io_serial_out+0x7"] {
            #expect(planned[accessor] == .entryThroughPadding, "\(accessor): \(planned[accessor].map(\.rawValue) ?? "none")")
        }
        #expect(planned["uart_putc+0x11"] == .functionEntry)
        #expect(planned.count >= 10)
    }

    @Test("c-poll-cpl3: the print loop written out in main (only short instructions in it) is entered through 5-byte instructions of the enclosing line loop")
    func pollLoopInMain() throws {
        let image = try Self.image("c-poll-cpl3")
        let d = try X86Disassembler()
        let symbol = try #require(image.symbols.symbols.first { $0.name == "main" })
        let main = try image.decode(symbol, disassembler: d)
        let hot = try #require(main.instructions.first { $0.groups.contains(.portIO) && $0.mnemonic == "in" })
        // The loops holding the `in`: backward branches over it; the innermost ones hold no 5-byte instruction.
        let loops = main.instructions.compactMap { i -> ClosedRange<UInt64>? in
            guard let t = i.branch?.target, !i.groups.contains(.call), main.contains(t), t <= hot.address, hot.address <= i.address else { return nil }
            return t...i.address
        }.sorted { $0.count < $1.count }
        let inner = try #require(loops.first), outer = try #require(loops.last)
        #expect(loops.count >= 2)
        #expect(!main.instructions.contains { inner.contains($0.address) && $0.length >= 5 }, "the poll/print loop holds only short instructions")
        let plan = try FunctionCopyPlan.make(hot: [HotRewrite(address: hot.address, bytes: [0x90])], in: image,
                                             at: 0xf0_0000, disassembler: d)
        let redirects = plan.entries.filter { $0.kind == .redirect }
        #expect(!redirects.isEmpty, "\(plan.entries.map(\.kind.rawValue)) \(plan.entryRefusals)")
        for e in redirects {
            #expect(outer.contains(e.site) && !inner.contains(e.site), "0x\(String(e.site, radix: 16)) lies in the line loop, outside the print loop")
            #expect(e.target == plan.copy.copyAddress(of: e.site))
            try expectBranchWrite(e.writes[0], to: e.target, d)
        }
    }
}

extension CGuestCopyTests {
    @Test("c-mmio-cpl3-O1: db_ring_full's copy is entered through the call in db_run's live copy (copied first), also where db_run's copy names an earlier copy of db_ring_full")
    func callSiteInLiveCopy() throws {
        let image = try Self.image("c-mmio-cpl3-O1")
        let d = try X86Disassembler()
        func function(_ name: String) throws -> DecodedFunction {
            try image.decode(try #require(image.symbols.symbols.first { $0.name == name }), disassembler: d)
        }
        let run = try function("db_run"), ringFull = try function("db_ring_full")
        let call = try #require(run.instructions.first { $0.groups.contains(.call) && $0.branch?.target == ringFull.start })
        let status = try #require(run.instructions.first { $0.mnemonic == "mov" && !$0.memoryOperands.isEmpty
                                                          && $0.description.hasPrefix("mov eax, dword ptr [rax]") })
        let store = try #require(ringFull.instructions.first { $0.mnemonic == "mov" && $0.description.hasPrefix("mov dword ptr [rax]") })
        let runPlan = try FunctionCopyPlan.make(hot: [HotRewrite(address: status.address, bytes: [0x90])], in: image,
                                                at: 0xf0_0000, disassembler: d)
        let ringPlan = try FunctionCopyPlan.make(hot: [HotRewrite(address: store.address, bytes: [0x90])], in: image,
                                                 at: 0xf1_0000, disassembler: d)
        // In the image: only the original call (db_ring_full's first instruction is 3 bytes, no padding in reach).
        #expect(ringPlan.entries.map(\.kind) == [.callSite], "\(ringPlan.entries.map(\.kind))")
        let entries = ringPlan.copy.callSiteEntries(in: runPlan.copy)
        #expect(entries.count == 1)
        let e = try #require(entries.first)
        let at = try #require(runPlan.copy.copyAddress(of: call.address))
        #expect(e.kind == .liveCopyCallSite && e.site == at && e.target == 0xf1_0000)
        let w = try #require(e.writes.first)
        #expect(e.writes.count == 1 && w.address == at)
        #expect(try d.decode(w.original, address: at, mode: .bits64).branch?.target == ringFull.start)
        let retargeted = try d.decode(w.replacement, address: at, mode: .bits64)
        #expect(retargeted.groups.contains(.call) && retargeted.branch?.target == 0xf1_0000)
        // db_run copied again while that entry was in the image's call site: its copy calls the earlier copy.
        let original = try #require(image.bytes(at: call.address, count: 5))
        let toCopy = try #require(CopyEncoding.branch32(call: true, at: call.address, to: 0xf1_0000))
        let patched = image.restoring([PatchWrite(address: call.address, original: toCopy, replacement: original)])
        let run2 = try FunctionCopyPlan.make(hot: [HotRewrite(address: status.address, bytes: [0x90])], in: patched,
                                             at: 0xf2_0000, disassembler: d)
        let ring2 = try FunctionCopyPlan.make(hot: [HotRewrite(address: store.address, bytes: [0x90])], in: image,
                                              at: 0xf3_0000, disassembler: d)
        #expect(ring2.copy.callSiteEntries(in: run2.copy).isEmpty, "db_run's second copy does not call db_ring_full itself")
        let again = ring2.copy.callSiteEntries(in: run2.copy, formerCopies: [0xf1_0000])
        #expect(again.count == 1)
        let w2 = try #require(again.first?.writes.first)
        #expect(try d.decode(w2.original, address: w2.address, mode: .bits64).branch?.target == 0xf1_0000)
        #expect(try d.decode(w2.replacement, address: w2.address, mode: .bits64).branch?.target == 0xf3_0000)
        // Not the copy's own recursion, not a call of another function.
        #expect(ringPlan.copy.callSiteEntries(in: ringPlan.copy).isEmpty)
    }
}

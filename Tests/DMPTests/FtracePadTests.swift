@testable import DMP
import Testing
import VMMKit
import X86Disassembler

/// Code built with a kernel's ftrace pads (``CodeAddressTable/recordsPads``): the functions are copied, but no entry
/// writes over a pad the guest's tables record.
@Suite("Ftrace pads")
struct FtracePadTests {
    /// `name`'s code image with its pad tables read from the file (as the planner reads them from guest memory).
    static func imageWithPads(_ name: String) throws -> CodeImage {
        let plain = try CGuestCopyTests.image(name)
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)
        let bytes = try ImageFile.read(parts.joined(separator: "/") + "/Guests/\(name).elf")
        let elf = try ELFImage(bytes: bytes)
        let tables = try (elf.sections ?? []).filter { CodeAddressTable.padSections.contains($0.name) }.map { s in
            let seg = try #require(elf.segments.first { s.address >= $0.virtualAddress && s.address - $0.virtualAddress < $0.fileSize })
            let at = Int(seg.fileOffset + (s.address - seg.virtualAddress))
            let addresses = stride(from: at, to: at + Int(s.size), by: 8).map { o in
                (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[o + $1]) << (8 * UInt64($1)) }
            }
            return CodeAddressTable(name: s.name, addresses: addresses, recordsPads: true)
        }
        return CodeImage(regions: plain.regions, symbols: plain.symbols, tables: tables)
    }

    @Test("c-uart-cpl3-ftrace: every function's 5-byte ftrace NOP and the sixteen NOPs before it are pads; the accessors' copies are planned without writing over one (without the tables, the entry instruction is the ftrace NOP and the jmp rel32 slots lie in the patchable NOPs)")
    func noEntryOverPads() throws {
        let image = try Self.imageWithPads("c-uart-cpl3-ftrace")
        let d = try X86Disassembler()
        #expect(Set(image.tables.map(\.name)) == ["__mcount_loc", "__patchable_function_entries"])
        let pads = image.pads(disassembler: d)
        for name in ["io_serial_in_slow", "io_serial_out_slow"] {
            let symbol = try #require(image.symbols.symbols.first { $0.name == name && $0.size > 0 })
            #expect(pads.contains(symbol.address..<symbol.address + 5), "\(name)'s ftrace NOP")
            #expect(pads.contains { $0.lowerBound == symbol.address - 16 && $0.upperBound >= symbol.address }, "\(name)'s patchable NOPs (and the NOP after them)")
            let f = try image.decode(symbol, disassembler: d)
            let hot = f.instructions.filter { $0.groups.contains(.portIO) }.map { HotRewrite(address: $0.address, bytes: [0x90]) }
            func overPads(_ plan: FunctionCopyPlan) -> Bool {
                plan.compatibleEntries.contains { e in e.writes.contains { w in pads.contains { $0.overlaps(w.range) } } }
            }
            let bare = CodeImage(regions: image.regions, symbols: image.symbols)
            #expect(overPads(try FunctionCopyPlan.make(hot: hot, in: bare, at: 0xf0_0000, disassembler: d)), "what the tables prevent")
            let plan = try FunctionCopyPlan.make(hot: hot, in: image, at: 0xf0_0000, disassembler: d, allowNoEntry: true)
            #expect(!overPads(plan), "\(plan.entries.map { ($0.kind, f.location($0.site)) })")
            // Functions holding pads are still copied whole.
            #expect(plan.copy.function.start == symbol.address)
        }
    }
}

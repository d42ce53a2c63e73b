import Testing
import VMMKit
@testable import X86Disassembler

/// The committed guest images (`Guests/*.elf`: assembled by GNU as, or compiled by gcc for `c-*`).
let guestImageNames = ["hello", "selftest", "uart-cpl0", "uart-cpl3", "uart-cpl0-pv", "uart-cpl3-pv", "doorbell-cpl3", "doorbell-cpl3-pv",
                       "c-uart-cpl3", "c-doorbell-cpl3", "c-selfmod-cpl3"]

@Suite("Decoding the committed guest images whole")
struct GuestImageTests {
    static let guests: String = {
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3) // Tests/X86DisassemblerTests/GuestImageTests.swift
        return parts.joined(separator: "/") + "/Guests"
    }()

    @Test("every sized function decodes from its start to exactly its end (DMP's function-copy precondition)", arguments: guestImageNames)
    func functionsDecodeWhole(name: String) throws {
        let file = try ImageFile.read(GuestImageTests.guests + "/" + name + ".elf")
        let elf = try ELFImage(bytes: file)
        let d = try X86Disassembler(mode: .bits64)
        // Long-mode code lives in the executable segments; 32-bit PVH entry code is decoded in 32-bit mode.
        var checked = 0
        var failures: [String] = []
        for sym in elf.symbols.symbols where sym.isFunction && sym.size > 0 {
            guard let seg = elf.segments.first(where: { $0.executable && sym.address >= $0.virtualAddress
                                                      && sym.address + sym.size <= $0.virtualAddress + $0.fileSize }) else { continue }
            let start = Int(seg.fileOffset + (sym.address - seg.virtualAddress))
            let bytes = Array(file[start..<start + Int(sym.size)])
            let mode: X86Mode = sym.name.hasPrefix("pvh_") || sym.name.hasSuffix("32") ? .bits32 : .bits64
            let decoded = d.decodeAll(bytes, address: sym.address, mode: mode)
            let end = decoded.last.map { $0.nextAddress } ?? sym.address
            if end != sym.address + sym.size {
                failures.append("\(sym.name) (\(mode)): stopped at +0x\(String(end - sym.address, radix: 16)) of 0x\(String(sym.size, radix: 16))")
            }
            checked += 1
        }
        #expect(checked > 5, "\(name): \(checked) functions")
        #expect(failures.isEmpty, "\(failures.joined(separator: "\n"))")
    }
}

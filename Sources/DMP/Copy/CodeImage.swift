import VMMKit
import X86Disassembler

/// The guest image's code as the function-copy planner sees it: its executable
/// bytes by guest-virtual address, its symbols, and the code-address tables it is
/// known to hold. Used to find the function around a hot instruction, the direct
/// `call rel32` sites that target it, and provably dead padding.
package struct CodeImage: Sendable {
    /// Bytes of the image at a guest-virtual address (a text segment).
    package struct Region: Hashable, Sendable {
        /// The first byte's guest-virtual address.
        package var address: UInt64
        /// The bytes.
        package var bytes: [UInt8]

        /// Creates a region.
        package init(address: UInt64, bytes: [UInt8]) { self.address = address; self.bytes = bytes }
    }

    /// The image's code.
    package let regions: [Region]
    /// The image's symbols.
    package let symbols: SymbolTable
    /// Code-address tables the guest holds (functions they name are not copied, padding they name is not dead).
    package let tables: [CodeAddressTable]
    /// Function symbols with a size.
    private let functions: SymbolTable

    /// Creates an image.
    package init(regions: [Region], symbols: SymbolTable, tables: [CodeAddressTable] = []) {
        self.regions = regions; self.symbols = symbols; self.tables = tables
        functions = SymbolTable(symbols.symbols.filter { $0.isFunction && $0.size > 0 })
    }

    /// `count` bytes at `address`, or `nil` unless one region holds them all.
    package func bytes(at address: UInt64, count: Int) -> [UInt8]? {
        for r in regions where address >= r.address && address &- r.address <= UInt64(r.bytes.count) {
            let start = Int(address &- r.address)
            guard count >= 0, start + count <= r.bytes.count else { return nil }
            return Array(r.bytes[start..<start + count])
        }
        return nil
    }

    /// The image with `writes` taken back: each write's original bytes where its replacement stands (what a
    /// rebuild of a function copy decodes: the guest's own code, not the old copy's entries).
    package func restoring(_ writes: [PatchWrite]) -> CodeImage {
        var regions = self.regions
        for w in writes {
            for k in regions.indices where w.address >= regions[k].address {
                let start = w.address &- regions[k].address
                guard start <= UInt64(regions[k].bytes.count), UInt64(regions[k].bytes.count) - start >= UInt64(w.original.count),
                      w.original.count == w.replacement.count else { continue }
                let range = Int(start)..<Int(start) + w.original.count
                if Array(regions[k].bytes[range]) == w.replacement { regions[k].bytes.replaceSubrange(range, with: w.original) }
            }
        }
        return CodeImage(regions: regions, symbols: symbols, tables: tables)
    }

    /// The pads the guest's pad tables record (``CodeAddressTable/recordsPads``), in address order: at each recorded
    /// address the instruction there and the NOPs that follow it, at most 64 bytes (`-fpatchable-function-entry=16,16`
    /// records the first of sixteen one-byte NOPs; `-mfentry` a `call __fentry__` or its 5-byte NOP).
    package func pads(disassembler: X86Disassembler) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        for t in tables where t.recordsPads {
            for a in t.addresses.prefix(CodeAddressTable.maximumAddresses) {
                guard let first = instruction(at: a, disassembler: disassembler) else { continue }
                var end = first.nextAddress
                while end &- a < 64, let i = instruction(at: end, disassembler: disassembler), i.mnemonic == "nop", end &- a + UInt64(i.length) <= 64 {
                    end = i.nextAddress
                }
                out.append(a..<end)
            }
        }
        return out.sorted { $0.lowerBound < $1.lowerBound }
    }

    /// The sized function symbol whose bytes hold `address`.
    package func function(containing address: UInt64) -> GuestSymbol? { functions.symbol(containing: address) }

    /// Decodes the function `symbol` whole (``DecodedFunction/decode(_:bytes:disassembler:)``).
    package func decode(_ symbol: GuestSymbol, disassembler: X86Disassembler) throws(DMPRefusal) -> DecodedFunction {
        guard symbol.size <= DecodedFunction.maximumSize, let b = bytes(at: symbol.address, count: Int(symbol.size)) else {
            throw DMPRefusal(.plan, "the bytes of \(symbol.name) are not in the image's code")
        }
        return try DecodedFunction.decode(symbol, bytes: b, disassembler: disassembler)
    }

    /// The direct `call rel32` and `jmp rel32` (tail call) instructions in the image that target `target`,
    /// trusting only sites whose instruction boundaries a whole, symbol-bounded decode of their own function
    /// confirms (a byte pattern inside another instruction, in data or in an unsized function is skipped).
    package func callSites(to target: UInt64, disassembler: X86Disassembler) -> [X86Instruction] {
        var decoded: [UInt64: DecodedFunction?] = [:]
        var out: [X86Instruction] = []
        for r in regions where r.bytes.count >= 5 {
            for k in 0...(r.bytes.count - 5) where r.bytes[k] == 0xe8 || r.bytes[k] == 0xe9 {
                let site = r.address &+ UInt64(k)
                let rel = Int32(bitPattern: UInt32(r.bytes[k + 1]) | UInt32(r.bytes[k + 2]) << 8
                                | UInt32(r.bytes[k + 3]) << 16 | UInt32(r.bytes[k + 4]) << 24)
                guard site &+ 5 &+ UInt64(bitPattern: Int64(rel)) == target, let s = function(containing: site) else { continue }
                if decoded[s.address] == nil { decoded[s.address] = .some(try? decode(s, disassembler: disassembler)) }
                guard let f = decoded[s.address] ?? nil, let i = f.index(at: site) else { continue }
                let insn = f.instructions[i]
                if insn.length == 5, insn.branch?.target == target { out.append(insn) }
            }
        }
        return out
    }
}

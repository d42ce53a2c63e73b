extension ELFImage {
    /// The most dynamic-section entries and relocations read (an image with more is refused).
    static let maximumDynamicEntries: UInt64 = 1 << 12
    static let maximumRelocations: UInt64 = 1 << 20

    /// Refuses an image that cannot run at its link addresses without relocation processing
    /// (``LoaderError/relocationRequired(_:)``); the loader applies none.
    ///
    /// - An `ET_DYN` whose lowest loadable segment is linked at 0 (gcc's default `-pie`/`-static-pie`): its
    ///   code expects a load base the loader chooses, and its relocations applied for that base.
    /// - `PT_INTERP`: the image asks for a dynamic linker.
    /// - `PT_DYNAMIC` naming relocations (`DT_RELA`, `DT_REL`, `DT_JMPREL`) that would change a byte at the link
    ///   address: any type but `R_X86_64_NONE` and `R_X86_64_RELATIVE`, and a `RELATIVE` entry of `DT_RELA` whose
    ///   8-byte field does not already hold its addend (GNU ld writes it there, so an `ld -pie` image linked at a
    ///   fixed address, which ld makes `ET_EXEC`, loads; lld by default leaves the field 0). `DT_RELR` and `DT_REL`
    ///   `RELATIVE` entries keep their addends in place: at the link address they change nothing.
    static func checkNoRelocationNeeded(_ r: ByteReader, type: UInt16, segments: [Segment], dynamic: (offset: UInt64, size: UInt64)?,
                                        interpreter: (offset: UInt64, size: UInt64)?) throws(LoaderError) {
        if type == 3, let low = segments.map(\.virtualAddress).min(), low == 0 {
            throw .relocationRequired("a position-independent executable (ET_DYN) linked at address 0 must be placed at a base "
                                      + "the loader chooses and its relocations applied; link it at a fixed address (-no-pie, "
                                      + "or -pie with a linker script that places it)")
        }
        if let i = interpreter {
            let bytes = try r.slice(i.offset, min(i.size, 256), "PT_INTERP")
            let path = String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
            throw .relocationRequired("it asks for the dynamic linker \(path) (PT_INTERP); a guest image must be static")
        }
        guard let d = dynamic else { return }
        try r.check(d.offset, d.size, "PT_DYNAMIC")
        var tags: [UInt64: UInt64] = [:]
        var k: UInt64 = 0
        while (k + 1) * 16 <= d.size {
            guard k < maximumDynamicEntries else { throw .inconsistent("PT_DYNAMIC holds more than \(maximumDynamicEntries) entries") }
            let tag = try r.u64(d.offset + k * 16, "a dynamic tag"), value = try r.u64(d.offset + k * 16 + 8, "a dynamic value")
            if tag == 0 { break } // DT_NULL
            if tags[tag] == nil { tags[tag] = value }
            k += 1
        }
        // DT_RELA (7), DT_RELASZ (8), DT_RELAENT (9); DT_REL (17), DT_RELSZ (18), DT_RELENT (19);
        // DT_JMPREL (23), DT_PLTRELSZ (2), DT_PLTREL (20: 7 RELA or 17 REL).
        if let table = tags[7], let size = tags[8] {
            try checkRelocations(r, segments: segments, table: table, size: size, entrySize: tags[9] ?? 24, withAddends: true, what: "DT_RELA")
        }
        if let table = tags[17], let size = tags[18] {
            try checkRelocations(r, segments: segments, table: table, size: size, entrySize: tags[19] ?? 16, withAddends: false, what: "DT_REL")
        }
        if let table = tags[23], let size = tags[2], size > 0 {
            let rela = (tags[20] ?? 7) == 7
            try checkRelocations(r, segments: segments, table: table, size: size, entrySize: rela ? 24 : 16, withAddends: rela,
                                 what: "DT_JMPREL")
        }
    }

    /// Checks one relocation table (at the virtual address `table`, `size` bytes) as ``checkNoRelocationNeeded``.
    private static func checkRelocations(_ r: ByteReader, segments: [Segment], table: UInt64, size: UInt64, entrySize: UInt64,
                                         withAddends: Bool, what: String) throws(LoaderError) {
        guard entrySize >= (withAddends ? 24 : 16) else { throw .inconsistent("\(what): entry size \(entrySize)") }
        let count = size / entrySize
        guard count <= maximumRelocations else { throw .inconsistent("\(what): more than \(maximumRelocations) relocations") }
        guard count > 0 else { return }
        guard let start = fileOffset(ofVirtual: table, size: count * entrySize, in: segments) else {
            throw .inconsistent("\(what) at 0x\(String(table, radix: 16)) is not in the file's loaded bytes")
        }
        func h(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        for k in 0..<count {
            let e = start + k * entrySize
            let offset = try r.u64(e, "a relocation's offset"), info = try r.u64(e + 8, "a relocation's info")
            let kind = info & 0xffff_ffff
            switch kind {
            case 0: continue // R_X86_64_NONE
            case 8 where !withAddends: continue // RELATIVE, implicit addend: already in place
            case 8:
                let addend = try r.u64(e + 16, "a relocation's addend")
                let field: UInt64
                if let at = fileOffset(ofVirtual: offset, size: 8, in: segments) {
                    field = try r.u64(at, "a relocated field")
                } else if segments.contains(where: { offset >= $0.virtualAddress && offset - $0.virtualAddress < $0.memorySize
                                                     && $0.memorySize - (offset - $0.virtualAddress) >= 8 }) {
                    field = 0 // in a segment's zero-filled tail
                } else {
                    throw .inconsistent("\(what): relocation at \(h(offset)) outside the loaded segments")
                }
                guard field == addend else {
                    throw .relocationRequired("\(what): R_X86_64_RELATIVE at \(h(offset)) holds \(h(field)), its link-time value is "
                                              + "\(h(addend)) (\(count) relocations in the table)")
                }
            default:
                throw .relocationRequired("\(what): relocation type \(kind) at \(h(offset)) (symbol \(info >> 32)) needs a dynamic linker")
            }
        }
    }

    /// The file offset of `size` bytes at the virtual address `address`, when one segment's file bytes hold them all.
    private static func fileOffset(ofVirtual address: UInt64, size: UInt64, in segments: [Segment]) -> UInt64? {
        for s in segments where address >= s.virtualAddress {
            let delta = address - s.virtualAddress
            if delta <= s.fileSize, s.fileSize - delta >= size { return s.fileOffset + delta }
        }
        return nil
    }
}

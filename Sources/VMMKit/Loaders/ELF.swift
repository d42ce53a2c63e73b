/// A bounds-checked little-endian reader over an image's bytes.
struct ByteReader {
    let bytes: [UInt8]

    func u8(_ off: UInt64, _ what: String) throws(LoaderError) -> UInt8 { UInt8(try uint(off, 1, what)) }
    func u16(_ off: UInt64, _ what: String) throws(LoaderError) -> UInt16 { UInt16(try uint(off, 2, what)) }
    func u32(_ off: UInt64, _ what: String) throws(LoaderError) -> UInt32 { UInt32(try uint(off, 4, what)) }
    func u64(_ off: UInt64, _ what: String) throws(LoaderError) -> UInt64 { try uint(off, 8, what) }

    func check(_ off: UInt64, _ len: UInt64, _ what: String) throws(LoaderError) {
        let (end, o) = off.addingReportingOverflow(len)
        guard !o, end <= UInt64(bytes.count) else {
            throw .truncated(what: what, needed: o ? UInt64.max : end, available: UInt64(bytes.count))
        }
    }

    private func uint(_ off: UInt64, _ n: Int, _ what: String) throws(LoaderError) -> UInt64 {
        try check(off, UInt64(n), what)
        var v: UInt64 = 0
        for i in 0..<n { v |= UInt64(bytes[Int(off) + i]) << (8 * UInt64(i)) }
        return v
    }

    func slice(_ off: UInt64, _ len: UInt64, _ what: String) throws(LoaderError) -> ArraySlice<UInt8> {
        try check(off, len, what)
        return bytes[Int(off)..<Int(off + len)]
    }
}

/// A parsed ELF64 x86-64 executable.
public struct ELFImage: Sendable {
    /// A loadable segment (`PT_LOAD`).
    public struct Segment: Hashable, Sendable {
        /// The guest-physical load address (`p_paddr`).
        public var physicalAddress: UInt64
        /// The virtual address (`p_vaddr`).
        public var virtualAddress: UInt64
        /// The file offset of the segment's bytes.
        public var fileOffset: UInt64
        /// Bytes taken from the file.
        public var fileSize: UInt64
        /// Bytes in memory (the rest is zeroed).
        public var memorySize: UInt64
        /// Whether the segment is executable (`PF_X` in `p_flags`).
        public var executable: Bool = true
    }

    /// `e_entry`.
    public var entry: UInt64
    /// The `PT_LOAD` segments.
    public var segments: [Segment]
    /// The PVH 32-bit entry (`XEN_ELFNOTE_PHYS32_ENTRY`), if the image has the note.
    public var pvhEntry: UInt32?
    /// The symbol table (empty when the image has none).
    public var symbols: SymbolTable
    /// An allocated section (`SHF_ALLOC`) as the section headers give it.
    package struct Section: Hashable, Sendable {
        /// The name, from the section-header string table (empty when there is none).
        package var name: String
        /// The virtual address (`sh_addr`).
        package var address: UInt64
        /// The size in memory (`sh_size`; `SHT_NOBITS` sections too).
        package var size: UInt64
        /// `SHF_WRITE`.
        package var writable: Bool
        /// `SHF_EXECINSTR`.
        package var executable: Bool
    }
    /// The allocated sections, or `nil` when the image has no usable section headers.
    package var sections: [Section]?

    /// The most section headers read (an image with more is treated as having none).
    static let maximumSections: UInt64 = 4096

    /// The largest image the loader accepts (1 GiB).
    public static let maximumSize = 1 << 30

    /// Parses and validates an ELF64 image.
    public init(bytes: [UInt8]) throws(LoaderError) {
        guard !bytes.isEmpty else { throw .empty }
        guard bytes.count <= ELFImage.maximumSize else { throw .inconsistent("image of \(bytes.count) bytes is too large") }
        let r = ByteReader(bytes: bytes)
        try r.check(0, 64, "the ELF header")
        guard bytes[0] == 0x7f, bytes[1] == 0x45, bytes[2] == 0x4c, bytes[3] == 0x46 else { throw .badMagic }
        guard bytes[4] == 2 else { throw .unsupportedFormat("not 64-bit (EI_CLASS \(bytes[4]))") }
        guard bytes[5] == 1 else { throw .unsupportedFormat("not little-endian (EI_DATA \(bytes[5]))") }
        let type = try r.u16(16, "e_type")
        guard type == 2 || type == 3 else { throw .unsupportedFormat("e_type \(type) is not an executable") }
        let machine = try r.u16(18, "e_machine")
        guard machine == 62 else { throw .unsupportedMachine(machine) }
        entry = try r.u64(24, "e_entry")
        let phoff = try r.u64(32, "e_phoff")
        let shoff = try r.u64(40, "e_shoff")
        let phentsize = UInt64(try r.u16(54, "e_phentsize"))
        let phnum = UInt64(try r.u16(56, "e_phnum"))
        let shentsize = UInt64(try r.u16(58, "e_shentsize"))
        let shnum = UInt64(try r.u16(60, "e_shnum"))
        guard phnum > 0 else { throw .noLoadableSegments }
        guard phentsize >= 56 else { throw .inconsistent("e_phentsize \(phentsize) < 56") }
        try r.check(phoff, phentsize * phnum, "the program headers")

        var segs: [Segment] = []
        var dynamic: (offset: UInt64, size: UInt64)?
        var interpreter: (offset: UInt64, size: UInt64)?
        var pvh: UInt32?
        var notesSeen = Set<UInt64>()
        for i in 0..<phnum {
            let ph = phoff + i * phentsize
            let ptype = try r.u32(ph, "p_type")
            let pflags = try r.u32(ph + 4, "p_flags")
            let offset = try r.u64(ph + 8, "p_offset")
            let vaddr = try r.u64(ph + 16, "p_vaddr")
            let paddr = try r.u64(ph + 24, "p_paddr")
            let filesz = try r.u64(ph + 32, "p_filesz")
            let memsz = try r.u64(ph + 40, "p_memsz")
            switch ptype {
            case 1: // PT_LOAD
                guard filesz <= memsz else { throw .inconsistent("segment \(i): p_filesz \(filesz) > p_memsz \(memsz)") }
                guard memsz <= 1 << 32 else { throw .inconsistent("segment \(i): p_memsz \(memsz) is absurd") }
                try r.check(offset, filesz, "segment \(i)'s bytes")
                guard paddr.addingReportingOverflow(memsz).overflow == false else {
                    throw .segmentOutsideMemory(index: Int(i), address: paddr, size: memsz)
                }
                if memsz > 0 {
                    segs.append(Segment(physicalAddress: paddr, virtualAddress: vaddr, fileOffset: offset, fileSize: filesz, memorySize: memsz,
                                        executable: pflags & 1 != 0))
                }
            case 2: // PT_DYNAMIC
                if dynamic == nil { dynamic = (offset, filesz) }
            case 3: // PT_INTERP
                if interpreter == nil { interpreter = (offset, filesz) }
            case 4: // PT_NOTE: each distinct note range is scanned once
                if pvh == nil, notesSeen.insert(offset).inserted, notesSeen.count <= 16,
                   let e = try ELFImage.pvhNote(r, offset: offset, size: filesz) { pvh = e }
            default:
                break
            }
        }
        guard !segs.isEmpty else { throw .noLoadableSegments }
        // Overlaps: sort by address and compare neighbours (O(n log n) for hostile counts).
        let order = segs.indices.sorted { segs[$0].physicalAddress < segs[$1].physicalAddress }
        for k in order.indices.dropFirst() {
            let a = order[k - 1], b = order[k]
            if segs[a].physicalAddress + segs[a].memorySize > segs[b].physicalAddress {
                throw .overlappingSegments(min(a, b), max(a, b))
            }
        }
        try ELFImage.checkNoRelocationNeeded(r, type: type, segments: segs, dynamic: dynamic, interpreter: interpreter)
        segments = segs
        pvhEntry = pvh
        symbols = (try? ELFImage.symbolTable(r, shoff: shoff, shentsize: shentsize, shnum: shnum)) ?? SymbolTable()
        let shstrndx = UInt64(try r.u16(62, "e_shstrndx"))
        sections = try? ELFImage.allocatedSections(r, shoff: shoff, shentsize: shentsize, shnum: shnum, shstrndx: shstrndx)

        let target = pvh.map(UInt64.init) ?? entry
        let inImage = segs.contains { target >= $0.physicalAddress && target - $0.physicalAddress < $0.memorySize }
            || segs.contains { target >= $0.virtualAddress && target - $0.virtualAddress < $0.memorySize }
        guard inImage else { throw .entryOutsideImage(target) }
    }

    /// Finds `XEN_ELFNOTE_PHYS32_ENTRY` (type 18, name "Xen") in a note segment.
    static func pvhNote(_ r: ByteReader, offset: UInt64, size: UInt64) throws(LoaderError) -> UInt32? {
        try r.check(offset, size, "a note segment")
        var off = offset
        let end = offset + size
        var count = 0
        while off + 12 <= end, count < 4096 {
            count += 1
            let namesz = UInt64(try r.u32(off, "a note's namesz"))
            let descsz = UInt64(try r.u32(off + 4, "a note's descsz"))
            let type = try r.u32(off + 8, "a note's type")
            let nameOff = off + 12
            let descOff = nameOff + ((namesz + 3) & ~3)
            let next = descOff + ((descsz + 3) & ~3)
            guard namesz <= size, descsz <= size, next <= end else { throw .inconsistent("a note runs past its segment") }
            let name = try r.slice(nameOff, namesz, "a note's name")
            if type == 18, Array(name.prefix(3)) == [0x58, 0x65, 0x6e] /* "Xen" */ {
                guard descsz >= 4 else { throw .inconsistent("PVH entry note with \(descsz)-byte descriptor") }
                let v = descsz >= 8 ? try r.u64(descOff, "the PVH entry") : UInt64(try r.u32(descOff, "the PVH entry"))
                guard v <= UInt64(UInt32.max) else { throw .inconsistent("PVH entry 0x\(String(v, radix: 16)) above 4 GiB") }
                return UInt32(v)
            }
            off = next
        }
        return nil
    }

    /// The allocated sections of the section headers; `nil` when there are none to read (or too many).
    static func allocatedSections(_ r: ByteReader, shoff: UInt64, shentsize: UInt64, shnum: UInt64,
                                  shstrndx: UInt64) throws(LoaderError) -> [Section]? {
        guard shoff != 0, shnum > 0, shnum <= maximumSections, shentsize >= 64 else { return nil }
        try r.check(shoff, shentsize * shnum, "the section headers")
        var names: (offset: UInt64, size: UInt64)?
        if shstrndx < shnum {
            let sh = shoff + shstrndx * shentsize
            let off = try r.u64(sh + 24, "shstrtab sh_offset"), size = try r.u64(sh + 32, "shstrtab sh_size")
            if (try? r.check(off, size, "the section-header string table")) != nil { names = (off, size) }
        }
        var out: [Section] = []
        for i in 0..<shnum {
            let sh = shoff + i * shentsize
            let flags = try r.u64(sh + 8, "sh_flags")
            guard flags & 0x2 != 0 else { continue } // SHF_ALLOC
            let address = try r.u64(sh + 16, "sh_addr"), size = try r.u64(sh + 32, "sh_size")
            guard !address.addingReportingOverflow(size).overflow else {
                throw .inconsistent("section \(i) at 0x\(String(address, radix: 16)) of \(size) bytes wraps")
            }
            var name: [UInt8] = []
            if let names {
                var p = names.offset + UInt64(try r.u32(sh, "sh_name"))
                while p < names.offset + names.size, r.bytes[Int(p)] != 0, name.count < 64 { name.append(r.bytes[Int(p)]); p += 1 }
            }
            out.append(Section(name: String(decoding: name, as: UTF8.self), address: address, size: size,
                               writable: flags & 0x1 != 0, executable: flags & 0x4 != 0))
        }
        return out
    }

    static func symbolTable(_ r: ByteReader, shoff: UInt64, shentsize: UInt64, shnum: UInt64) throws(LoaderError) -> SymbolTable {
        guard shoff != 0, shnum > 0, shentsize >= 64 else { return SymbolTable() }
        try r.check(shoff, shentsize * shnum, "the section headers")
        var out: [GuestSymbol] = []
        // ELF has at most one SHT_SYMTAB: use the first, with bounded work.
        for i in 0..<shnum {
            let sh = shoff + i * shentsize
            guard try r.u32(sh + 4, "sh_type") == 2 else { continue } // SHT_SYMTAB
            let off = try r.u64(sh + 24, "sh_offset")
            let size = try r.u64(sh + 32, "sh_size")
            let link = UInt64(try r.u32(sh + 40, "sh_link"))
            let entsize = try r.u64(sh + 56, "sh_entsize")
            guard entsize >= 24, link < shnum else { continue }
            let strSh = shoff + link * shentsize
            let strOff = try r.u64(strSh + 24, "strtab sh_offset")
            let strSize = try r.u64(strSh + 32, "strtab sh_size")
            try r.check(strOff, strSize, "the string table")
            try r.check(off, size, "the symbol table")
            let count = min(size / entsize, 1 << 16)
            for k in 0..<count {
                let s = off + k * entsize
                let nameIdx = UInt64(try r.u32(s, "st_name"))
                let info = try r.u8(s + 4, "st_info")
                let value = try r.u64(s + 8, "st_value")
                let ssize = try r.u64(s + 16, "st_size")
                let stype = info & 0xf
                guard stype == 0 || stype == 1 || stype == 2, nameIdx < strSize, value != 0 else { continue }
                var name: [UInt8] = []
                var p = strOff + nameIdx
                while p < strOff + strSize, r.bytes[Int(p)] != 0, name.count < 128 { name.append(r.bytes[Int(p)]); p += 1 }
                out.append(GuestSymbol(name: String(decoding: name, as: UTF8.self), address: value, size: ssize, isFunction: stype == 2))
            }
            break // only the first SHT_SYMTAB, whatever it held
        }
        return SymbolTable(out)
    }
}

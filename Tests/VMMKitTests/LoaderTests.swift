import Testing
import VMMKit
import VMMKitTesting

/// Builds a minimal ELF64 x86-64 executable with the given program headers.
struct ELFBuilder {
    struct PH { var type: UInt32 = 1; var offset: UInt64; var vaddr: UInt64; var paddr: UInt64; var filesz: UInt64; var memsz: UInt64 }
    var entry: UInt64 = 0x100000
    var type: UInt16 = 2
    var machine: UInt16 = 62
    var elfClass: UInt8 = 2
    var phs: [PH] = []
    var payload: [UInt8] = []

    func bytes() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 64)
        b[0] = 0x7f; b[1] = 0x45; b[2] = 0x4c; b[3] = 0x46; b[4] = elfClass; b[5] = 1; b[6] = 1
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) { withUnsafeBytes(of: v.littleEndian) { for (i, x) in $0.enumerated() { b[at + i] = x } } }
        put(type, 16); put(machine, 18); put(UInt32(1), 20); put(entry, 24)
        put(UInt64(64), 32); put(UInt16(64), 52); put(UInt16(56), 54); put(UInt16(phs.count), 56)
        for ph in phs {
            var p = [UInt8](repeating: 0, count: 56)
            func pp<T: FixedWidthInteger>(_ v: T, _ at: Int) { withUnsafeBytes(of: v.littleEndian) { for (i, x) in $0.enumerated() { p[at + i] = x } } }
            pp(ph.type, 0); pp(UInt32(5), 4); pp(ph.offset, 8); pp(ph.vaddr, 16); pp(ph.paddr, 24); pp(ph.filesz, 32); pp(ph.memsz, 40)
            b += p
        }
        return b + payload
    }
}

/// A PVH note: name "Xen", type 18, 4-byte descriptor.
func pvhNote(entry: UInt32) -> [UInt8] {
    var n: [UInt8] = []
    func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { n += $0 } }
    u32(4); u32(4); u32(18)
    n += [0x58, 0x65, 0x6e, 0]
    u32(entry)
    return n
}

@Suite("ELF and PVH loading")
struct LoaderTests {
    func code(at offset: UInt64) -> ELFBuilder.PH { .init(offset: offset, vaddr: 0x100000, paddr: 0x100000, filesz: 16, memsz: 0x2000) }

    @Test("a valid image parses; a PVH note wins over e_entry")
    func valid() throws {
        var b = ELFBuilder()
        let phEnd: UInt64 = 64 + 56 * 2
        b.phs = [code(at: phEnd), .init(type: 4, offset: phEnd + 16, vaddr: 0, paddr: 0, filesz: 20, memsz: 20)]
        b.payload = [UInt8](repeating: 0x90, count: 16) + pvhNote(entry: 0x100004)
        let img = try ELFImage(bytes: b.bytes())
        #expect(img.pvhEntry == 0x100004 && img.entry == 0x100000 && img.segments.count == 1)
        let mock = MockHypervisor()
        let vm = try makeVM(mock, memory: 32 << 20)
        let loaded = try X86Boot.load(.elf(b.bytes()), commandLine: "a=1", into: vm)
        #expect(loaded.entry == .pvh(0x100004))
        #expect(try vm.memory.read(UInt32.self, at: GuestAddress(0x7000)) == 0x336e_c578, "hvm_start_info magic")
        #expect(try vm.memory.readBytes(at: GuestAddress(0x8000), count: 4) == Array("a=1".utf8) + [0])
        #expect(try vm.memory.read(UInt8.self, at: GuestAddress(0x100010)) == 0, "bss zeroed")
        #expect(mock.vcpu(0)?.currentRegisters.rip == 0x100004 && mock.vcpu(0)?.currentRegisters.rbx == 0x7000)
        #expect(mock.vcpu(0)?.cpuid.first { $0.function == 1 }.map { $0.ecx >> 31 } == 1, "hypervisor bit")
    }

    @Test("malformed images get typed errors", arguments: [
        ("empty", [UInt8]()),
        ("bad magic", [UInt8](repeating: 0x41, count: 64)),
        ("truncated header", [0x7f, 0x45, 0x4c, 0x46, 2, 1]),
    ])
    func malformedBytes(name: String, bytes: [UInt8]) {
        #expect(throws: LoaderError.self) { _ = try ELFImage(bytes: bytes) }
    }

    @Test("inconsistent headers get typed errors")
    func inconsistent() {
        var b = ELFBuilder(); b.elfClass = 1; b.phs = [code(at: 120)]; b.payload = .init(repeating: 0, count: 16)
        #expect(throws: LoaderError.unsupportedFormat("not 64-bit (EI_CLASS 1)")) { _ = try ELFImage(bytes: b.bytes()) }
        b = ELFBuilder(); b.machine = 3; b.phs = [code(at: 120)]; b.payload = .init(repeating: 0, count: 16)
        #expect(throws: LoaderError.unsupportedMachine(3)) { _ = try ELFImage(bytes: b.bytes()) }
        b = ELFBuilder(); b.phs = [code(at: 4096)]
        #expect(throws: LoaderError.self, "segment bytes past the end of the file") { _ = try ELFImage(bytes: b.bytes()) }
        b = ELFBuilder(); b.phs = [.init(offset: 120, vaddr: 0x100000, paddr: 0x100000, filesz: 32, memsz: 16)]; b.payload = .init(repeating: 0, count: 32)
        #expect(throws: LoaderError.self, "filesz > memsz") { _ = try ELFImage(bytes: b.bytes()) }
        b = ELFBuilder(); b.phs = [.init(offset: 176, vaddr: 0x100000, paddr: 0x100000, filesz: 8, memsz: 0x2000),
                                   .init(offset: 176, vaddr: 0x101000, paddr: 0x101000, filesz: 8, memsz: 0x2000)]
        b.payload = .init(repeating: 0, count: 8)
        #expect(throws: LoaderError.overlappingSegments(0, 1)) { _ = try ELFImage(bytes: b.bytes()) }
        b = ELFBuilder(); b.phs = [.init(offset: 120, vaddr: 0, paddr: UInt64.max - 8, filesz: 0, memsz: 0x100)]
        #expect(throws: LoaderError.self, "address overflow") { _ = try ELFImage(bytes: b.bytes()) }
        b = ELFBuilder(); b.entry = 0x900000; b.phs = [code(at: 120)]; b.payload = .init(repeating: 0, count: 16)
        #expect(throws: LoaderError.entryOutsideImage(0x900000)) { _ = try ELFImage(bytes: b.bytes()) }
        b = ELFBuilder(); b.phs = [.init(offset: 120, vaddr: 0x100000, paddr: 0x100000, filesz: 0, memsz: 1 << 40)]
        #expect(throws: LoaderError.self, "absurd size") { _ = try ELFImage(bytes: b.bytes()) }
    }

    @Test("segments outside RAM or in reserved memory are refused", arguments: [UInt64(0x1000), 0xE0_0000, 0x1FF_F000, 0xC000_0000])
    func placement(paddr: UInt64) throws {
        var b = ELFBuilder()
        b.entry = paddr
        b.phs = [.init(offset: 120, vaddr: paddr, paddr: paddr, filesz: 16, memsz: 0x2000)]
        b.payload = .init(repeating: 0, count: 16)
        let vm = try makeVM(MockHypervisor(), memory: 32 << 20)
        #expect {
            _ = try X86Boot.load(.elf(b.bytes()), into: vm)
        } throws: { e in
            if case VMError.loader(.segmentOutsideMemory) = e { return true }
            return false
        }
    }

    /// A position-independent image: code at `base` (16 NOPs), an 8-byte pointer field at `base + 0x10` holding
    /// `field`, and a `PT_DYNAMIC` whose `DT_RELA` table holds one relocation of `kind` at that field with addend
    /// `base + 8` (what GNU ld emits for `.quad sym` in a PIE: `R_X86_64_RELATIVE`, the field written in place).
    func pie(type: UInt16, base: UInt64, field: UInt64, kind: UInt64 = 8, interpreter: Bool = false) -> [UInt8] {
        var b = ELFBuilder()
        b.type = type
        b.entry = base
        let phCount: UInt64 = interpreter ? 3 : 2
        let data = 64 + 56 * phCount // the file offset of the loaded bytes
        var payload = [UInt8](repeating: 0x90, count: 16)
        func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { payload += $0 } }
        u64(field)                                           // base + 0x10: the relocated field
        u64(base + 0x10); u64(UInt64(kind)); u64(base + 8)   // base + 0x18: the Elf64_Rela
        for (tag, value) in [(UInt64(7), base + 0x18), (8, 24), (9, 24), (0, 0)] { u64(tag); u64(value) } // base + 0x30: dynamic
        let interp = Array("/lib64/ld-linux-x86-64.so.2".utf8) + [0]
        b.phs = [.init(offset: data, vaddr: base, paddr: base, filesz: UInt64(payload.count), memsz: 0x2000),
                 .init(type: 2, offset: data + 0x30, vaddr: base + 0x30, paddr: base + 0x30, filesz: 64, memsz: 64)]
        if interpreter {
            b.phs.append(.init(type: 3, offset: data + UInt64(payload.count), vaddr: 0, paddr: 0, filesz: UInt64(interp.count), memsz: 0))
            payload += interp
        }
        b.payload = payload
        return b.bytes()
    }

    @Test("position-independent images: loaded where linked when that needs no relocation processing (ET_EXEC or ET_DYN with RELATIVE fields already holding their values, as GNU ld -pie at a fixed address writes them); refused with relocationRequired naming why otherwise (ET_DYN linked at 0, a field not yet relocated, a symbolic relocation, PT_INTERP)")
    func positionIndependent() throws {
        func refusal(_ bytes: [UInt8]) -> String? {
            do { _ = try ELFImage(bytes: bytes); return nil } catch {
                if case .relocationRequired(let why) = error { return why }
                return "other: \(error)"
            }
        }
        for type: UInt16 in [2, 3] {
            let img = try ELFImage(bytes: pie(type: type, base: 0x100000, field: 0x100008))
            #expect(img.segments.count == 1 && img.entry == 0x100000)
            let vm = try makeVM(MockHypervisor(), memory: 32 << 20)
            _ = try X86Boot.load(.elf(pie(type: type, base: 0x100000, field: 0x100008)), into: vm)
            #expect(try vm.memory.read(UInt64.self, at: GuestAddress(0x100010)) == 0x100008, "the field as linked")
            #expect(refusal(pie(type: type, base: 0x100000, field: 0))?.contains("R_X86_64_RELATIVE at 0x100010 holds 0x0") == true,
                    "a field left for the loader (lld's default)")
            #expect(refusal(pie(type: type, base: 0x100000, field: 0x100008, kind: 6))?.contains("relocation type 6 at 0x100010") == true,
                    "R_X86_64_GLOB_DAT")
            #expect(refusal(pie(type: type, base: 0x100000, field: 0x100008, interpreter: true))?.contains("/lib64/ld-linux-x86-64.so.2") == true)
        }
        #expect(refusal(pie(type: 3, base: 0, field: 8))?.contains("ET_DYN") == true, "gcc's default -pie: linked at 0")
        let vm = try makeVM(MockHypervisor(), memory: 32 << 20)
        #expect { _ = try X86Boot.load(.elf(pie(type: 3, base: 0, field: 8)), into: vm) } throws: { e in
            if case VMError.loader(.relocationRequired) = e { return true }
            return false
        }
    }

    @Test("a truncated PVH note is refused")
    func badNote() {
        var b = ELFBuilder()
        b.phs = [code(at: 176), .init(type: 4, offset: 192, vaddr: 0, paddr: 0, filesz: 40, memsz: 40)]
        b.payload = [UInt8](repeating: 0x90, count: 16) + pvhNote(entry: 0x100000).prefix(14)
        #expect(throws: LoaderError.self) { _ = try ELFImage(bytes: b.bytes()) }
    }

    @Test("flat binaries load at their address and enter in long mode; too-small memory and long command lines are refused")
    func flat() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock, memory: 32 << 20)
        let l = try X86Boot.load(.flat([0xf4], loadAddress: 0x200000), into: vm)
        #expect(l.entry == .long64(0x200000))
        #expect(try vm.memory.read(UInt8.self, at: GuestAddress(0x200000)) == 0xf4)
        #expect(mock.vcpu(0)?.currentRegisters.rsp == X86Layout.initialStack)
        #expect(throws: VMError.self) { _ = try X86Boot.load(.flat([]), into: vm) }
        #expect(throws: VMError.self) { _ = try X86Boot.load(.flat([1], loadAddress: 0x100000, entry: 0x300000), into: vm) }
        #expect(throws: VMError.self) {
            _ = try X86Boot.load(.flat([1]), commandLine: String(repeating: "x", count: 40000), into: vm)
        }
        let small = try makeVM(MockHypervisor(), memory: 8 << 20)
        #expect(throws: VMError.self) { _ = try X86Boot.load(.flat([1]), into: small) }
    }

    @Test("symbols resolve to name+offset")
    func symbols() {
        let t = SymbolTable([GuestSymbol(name: "uart_putc", address: 0x100400, size: 0x13, isFunction: true),
                             GuestSymbol(name: "main", address: 0x100000, size: 0x100, isFunction: true)])
        #expect(t.symbolize(0x100405) == "uart_putc+0x5")
        #expect(t.symbolize(0x100000) == "main")
        #expect(t.symbolize(0x100200) == nil)
        #expect(t.symbolize(0x10) == nil)
    }
}

@Suite("Image files")
struct ImageFileTests {
    @Test("a missing image file is a typed error naming the path and errno")
    func missing() {
        #expect(throws: LoaderError.unreadable(path: "/nonexistent/guest.elf", errno: .noSuchFile)) {
            _ = try ImageFile.read("/nonexistent/guest.elf")
        }
    }
}

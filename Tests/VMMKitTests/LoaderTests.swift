import Testing
import VMMKit
import VMMKitTesting

/// Builds a minimal ELF64 x86-64 executable with the given program headers.
struct ELFBuilder {
    struct PH { var type: UInt32 = 1; var offset: UInt64; var vaddr: UInt64; var paddr: UInt64; var filesz: UInt64; var memsz: UInt64 }
    var entry: UInt64 = 0x100000
    var machine: UInt16 = 62
    var elfClass: UInt8 = 2
    var phs: [PH] = []
    var payload: [UInt8] = []

    func bytes() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 64)
        b[0] = 0x7f; b[1] = 0x45; b[2] = 0x4c; b[3] = 0x46; b[4] = elfClass; b[5] = 1; b[6] = 1
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) { withUnsafeBytes(of: v.littleEndian) { for (i, x) in $0.enumerated() { b[at + i] = x } } }
        put(UInt16(2), 16); put(machine, 18); put(UInt32(1), 20); put(entry, 24)
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

import Testing
import VMMKit
@testable import X86Disassembler

@Suite("Plain device accesses, as DMP's planner sees them")
struct AccessShapeTests {
    let d: X86Disassembler
    init() throws { d = try X86Disassembler(mode: .bits64) }

    func shape(_ bytes: [UInt8]) throws -> Result<X86AccessShape, X86AccessRefusal> { try d.decode(bytes).accessShape }

    @Test("port I/O, loads and stores have a shape")
    func shapes() throws {
        #expect(try shape([0xee]) == .success(.portOut(width: 1, source: .al, portInDX: true)))
        #expect(try shape([0xe5, 0x60]) == .success(.portIn(width: 4, destination: .eax, portInDX: false)))
        #expect(try shape([0x66, 0xed]) == .success(.portIn(width: 2, destination: .ax, portInDX: true)))
        let rsi40 = X86MemoryOperand(base: .rsi, displacement: 0x40)
        #expect(try shape([0x89, 0x46, 0x40]) == .success(.store(width: 4, source: .register(.eax), memory: rsi40)))
        #expect(try shape([0x8b, 0x46, 0x40]) == .success(.load(width: 4, destination: .eax, memory: rsi40, extension: .none)))
        #expect(try shape([0x0f, 0xb6, 0x46, 0x40]) == .success(.load(width: 1, destination: .eax, memory: rsi40, extension: .zero)))
        #expect(try shape([0x48, 0x63, 0x46, 0x40]) == .success(.load(width: 4, destination: .rax, memory: rsi40, extension: .sign)))
        #expect(try shape([0x66, 0xc7, 0x46, 0x40, 0x34, 0x12]) == .success(.store(width: 2, source: .immediate(0x1234), memory: rsi40)))
        #expect(try shape([0x88, 0x05, 0, 1, 0, 0]) == .success(.store(width: 1, source: .register(.al), memory: X86MemoryOperand(base: .rip, displacement: 0x100))))
    }

    @Test("everything else is refused with its reason")
    func refusals() throws {
        #expect(try shape([0x01, 0x46, 0x40]) == .failure(.readModifyWrite), "add [rsi+0x40], eax")
        #expect(try shape([0x87, 0x06]) == .failure(.readModifyWrite), "xchg")
        #expect(try shape([0xf0, 0x0f, 0xb1, 0x0e]) == .failure(.locked), "lock cmpxchg")
        #expect(try shape([0x39, 0x06]) == .failure(.setsFlags), "cmp [rsi], eax")
        #expect(try shape([0xf6, 0x06, 0x01]) == .failure(.setsFlags), "test byte ptr [rsi], 1")
        #expect(try shape([0xf3, 0xab]) == .failure(.string), "rep stosd")
        #expect(try shape([0x6e]) == .failure(.string), "outsb")
        #expect(try shape([0x64, 0x8b, 0x04, 0x25, 0x28, 0, 0, 0]) == .failure(.segmentOrAddressSize), "fs:")
        #expect(try shape([0x67, 0x89, 0x06]) == .failure(.segmentOrAddressSize), "67")
        #expect(try shape([0x0f, 0x11, 0x06]) == .failure(.notPlainAccess), "movups store")
        #expect(try shape([0xff, 0x36]) == .failure(.notPlainAccess), "push [rsi]")
        #expect(try shape([0x8d, 0x46, 0x40]) == .failure(.notPlainAccess), "lea")
        #expect(try shape([0x89, 0xc8]) == .failure(.notPlainAccess), "mov eax, ecx")
    }
}

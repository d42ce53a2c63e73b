@testable import DMP
import Testing
import X86Disassembler

/// One emitted instruction: what the decoder must read back.
struct Shape: CustomStringConvertible, Sendable {
    var text: String
    var length: Int
    var emit: @Sendable (inout X86Assembler) throws(DMPRefusal) -> Void
    var description: String { text }
}

typealias Mem = X86Assembler.Memory

/// The origin every shape is emitted at, and a data address near it (RIP-relative operands).
let origin: UInt64 = 0x20_0000
let data: UInt64 = 0x20_1000

/// The shapes the encoder emits, each with the Intel text Capstone gives for it.
let shapes: [Shape] = [
    Shape(text: "mov rax, rbx", length: 3) { a throws(DMPRefusal) in try a.mov(.rax, .rbx) },
    Shape(text: "mov r9d, r10d", length: 3) { a throws(DMPRefusal) in try a.mov(.r9d, .r10d) },
    Shape(text: "mov sil, al", length: 3) { a throws(DMPRefusal) in try a.mov(.sil, .al) },
    Shape(text: "mov ah, bl", length: 2) { a throws(DMPRefusal) in try a.mov(.ah, .bl) },
    Shape(text: "mov ax, r8w", length: 4) { a throws(DMPRefusal) in try a.mov(.ax, .r8w) },
    Shape(text: "mov rax, qword ptr [rbx + 8]", length: 4) { a throws(DMPRefusal) in try a.mov(.rax, Mem(base: .rbx, displacement: 8)) },
    Shape(text: "mov ecx, dword ptr [rsp + 0x10]", length: 4) { a throws(DMPRefusal) in try a.mov(.ecx, Mem(base: .rsp, displacement: 16)) },
    Shape(text: "mov dl, byte ptr [rbp]", length: 3) { a throws(DMPRefusal) in try a.mov(.dl, Mem(base: .rbp)) },
    Shape(text: "mov r13w, word ptr [r13 + r12*4 - 0x1000]", length: 9) { a throws(DMPRefusal) in
        try a.mov(.r13w, Mem(base: .r13, index: .r12, scale: 4, displacement: -0x1000))
    },
    Shape(text: "mov eax, dword ptr [r12]", length: 4) { a throws(DMPRefusal) in try a.mov(.eax, Mem(base: .r12)) },
    Shape(text: "mov eax, dword ptr [rcx*8 + 0x400]", length: 7) { a throws(DMPRefusal) in try a.mov(.eax, Mem(index: .rcx, scale: 8, displacement: 0x400)) },
    Shape(text: "mov eax, dword ptr [0x1000]", length: 7) { a throws(DMPRefusal) in try a.mov(.eax, Mem(displacement: 0x1000)) },
    Shape(text: "mov bh, byte ptr [rip + 0xffa]", length: 6) { a throws(DMPRefusal) in try a.mov(.bh, .at(data)) },
    Shape(text: "mov qword ptr [rip + 0xff9], r15", length: 7) { a throws(DMPRefusal) in try a.mov(.at(data), .r15) },
    Shape(text: "mov byte ptr [rdi], dil", length: 3) { a throws(DMPRefusal) in try a.mov(Mem(base: .rdi), .dil) },
    Shape(text: "mov word ptr [rsi + 2], dx", length: 4) { a throws(DMPRefusal) in try a.mov(Mem(base: .rsi, displacement: 2), .dx) },
    Shape(text: "mov al, 0x60", length: 2) { a throws(DMPRefusal) in try a.mov(.al, immediate: 0x60) },
    Shape(text: "mov ch, 0xff", length: 2) { a throws(DMPRefusal) in try a.mov(.ch, immediate: 0x1ff) },
    Shape(text: "mov r11b, 1", length: 3) { a throws(DMPRefusal) in try a.mov(.r11b, immediate: 1) },
    Shape(text: "mov ax, 0x1234", length: 4) { a throws(DMPRefusal) in try a.mov(.ax, immediate: 0x1234) },
    Shape(text: "mov r8d, 0x80000000", length: 6) { a throws(DMPRefusal) in try a.mov(.r8d, immediate: 0x8000_0000) },
    Shape(text: "mov eax, 0xd0000040", length: 5) { a throws(DMPRefusal) in try a.mov(.rax, immediate: 0xd000_0040) },
    Shape(text: "mov rdx, -1", length: 7) { a throws(DMPRefusal) in try a.mov(.rdx, immediate: UInt64.max) },
    Shape(text: "movabs r10, 0x123456789", length: 10) { a throws(DMPRefusal) in try a.mov(.r10, immediate: 0x1_2345_6789) },
    Shape(text: "mov byte ptr [rax], 0x41", length: 3) { a throws(DMPRefusal) in try a.mov(Mem(base: .rax), width: 1, immediate: 0x41) },
    Shape(text: "mov word ptr [rip + 0xff7], 0x3f8", length: 9) { a throws(DMPRefusal) in try a.mov(.at(data), width: 2, immediate: 0x3f8) },
    Shape(text: "mov dword ptr [rip + 0xff6], 1", length: 10) { a throws(DMPRefusal) in try a.mov(.at(data), width: 4, immediate: 1) },
    Shape(text: "mov qword ptr [rbx], -1", length: 7) { a throws(DMPRefusal) in try a.mov(Mem(base: .rbx), width: 8, immediate: -1) },
    Shape(text: "movzx eax, al", length: 3) { a throws(DMPRefusal) in try a.movzx(.eax, .al) },
    Shape(text: "movzx esi, ah", length: 3) { a throws(DMPRefusal) in try a.movzx(.esi, .ah) },
    Shape(text: "movzx r10d, ax", length: 4) { a throws(DMPRefusal) in try a.movzx(.r10d, .ax) },
    Shape(text: "movzx rax, byte ptr [rip + 0xff8]", length: 8) { a throws(DMPRefusal) in try a.movzx(.rax, .at(data), width: 1) },
    Shape(text: "movzx cx, byte ptr [rdx]", length: 4) { a throws(DMPRefusal) in try a.movzx(.cx, Mem(base: .rdx), width: 1) },
    Shape(text: "movzx eax, word ptr [rbx + 4]", length: 4) { a throws(DMPRefusal) in try a.movzx(.eax, Mem(base: .rbx, displacement: 4), width: 2) },
    Shape(text: "movsx eax, byte ptr [rbx]", length: 3) { a throws(DMPRefusal) in try a.movsx(.eax, Mem(base: .rbx), width: 1) },
    Shape(text: "movsx rdx, word ptr [rbx]", length: 4) { a throws(DMPRefusal) in try a.movsx(.rdx, Mem(base: .rbx), width: 2) },
    Shape(text: "movsxd rdx, dword ptr [rip + 0xff9]", length: 7) { a throws(DMPRefusal) in try a.movsx(.rdx, .at(data), width: 4) },
    Shape(text: "movsxd r9, ecx", length: 3) { a throws(DMPRefusal) in try a.movsx(.r9, .ecx) },
    Shape(text: "lea rsp, [rsp - 0x80]", length: 5) { a throws(DMPRefusal) in try a.lea(.rsp, Mem(base: .rsp, displacement: -128)) },
    Shape(text: "lea rsp, [rsp + 0x80]", length: 8) { a throws(DMPRefusal) in try a.lea(.rsp, Mem(base: .rsp, displacement: 128)) },
    Shape(text: "lea edx, [r8 + 1]", length: 4) { a throws(DMPRefusal) in try a.lea(.edx, Mem(base: .r8, displacement: 1)) },
    Shape(text: "lea rcx, [rdx + rcx*8]", length: 4) { a throws(DMPRefusal) in try a.lea(.rcx, Mem(base: .rdx, index: .rcx, scale: 8)) },
    Shape(text: "lea r11, [rip + 0xff9]", length: 7) { a throws(DMPRefusal) in try a.lea(.r11, .at(data)) },
    Shape(text: "push rax", length: 1) { a throws(DMPRefusal) in try a.push(.rax) },
    Shape(text: "push r15", length: 2) { a throws(DMPRefusal) in try a.push(.r15) },
    Shape(text: "pop rbp", length: 1) { a throws(DMPRefusal) in try a.pop(.rbp) },
    Shape(text: "pop r8", length: 2) { a throws(DMPRefusal) in try a.pop(.r8) },
    Shape(text: "pushfq", length: 1) { a throws(DMPRefusal) in a.pushfq() },
    Shape(text: "lahf", length: 1) { a throws(DMPRefusal) in a.lahf() },
    Shape(text: "sahf", length: 1) { a throws(DMPRefusal) in a.sahf() },
    Shape(text: "seto al", length: 3) { a throws(DMPRefusal) in a.setoAL() },
    Shape(text: "add al, 0x7f", length: 2) { a throws(DMPRefusal) in a.addAL(0x7f) },
    Shape(text: "popfq", length: 1) { a throws(DMPRefusal) in a.popfq() },
    Shape(text: "add rax, rbx", length: 3) { a throws(DMPRefusal) in try a.add(.rax, .rbx) },
    Shape(text: "add r9d, 1", length: 4) { a throws(DMPRefusal) in try a.add(.r9d, immediate: 1) },
    Shape(text: "add rax, 0x1000", length: 7) { a throws(DMPRefusal) in try a.add(.rax, immediate: 0x1000) },
    Shape(text: "sub rax, r8", length: 3) { a throws(DMPRefusal) in try a.sub(.rax, .r8) },
    Shape(text: "sub cl, 3", length: 3) { a throws(DMPRefusal) in try a.sub(.cl, immediate: 3) },
    Shape(text: "cmp eax, r8d", length: 3) { a throws(DMPRefusal) in try a.cmp(.eax, .r8d) },
    Shape(text: "cmp dx, 0x3f8", length: 5) { a throws(DMPRefusal) in try a.cmp(.dx, immediate: 0x3f8) },
    Shape(text: "cmp dx, 0x80", length: 5) { a throws(DMPRefusal) in try a.cmp(.dx, immediate: 0x80) },
    Shape(text: "cmp r10, -0x10", length: 4) { a throws(DMPRefusal) in try a.cmp(.r10, immediate: -16) },
    Shape(text: "cmp dword ptr [rip + 0xff9], 0", length: 7) { a throws(DMPRefusal) in try a.cmp(.at(data), width: 4, immediate: 0) },
    Shape(text: "cmp byte ptr [rsi], 0xff", length: 3) { a throws(DMPRefusal) in try a.cmp(Mem(base: .rsi), width: 1, immediate: 255) },
    Shape(text: "and ecx, 0x1ff", length: 6) { a throws(DMPRefusal) in try a.and(.ecx, immediate: 0x1ff) },
    Shape(text: "and ecx, 3", length: 3) { a throws(DMPRefusal) in try a.and(.ecx, immediate: 3) },
    Shape(text: "or rdx, r11", length: 3) { a throws(DMPRefusal) in try a.or(.rdx, .r11) },
    Shape(text: "xor eax, eax", length: 2) { a throws(DMPRefusal) in try a.arithmetic(.xor, .eax, .eax) },
    Shape(text: "add qword ptr [rbx + 8], rax", length: 4) { a throws(DMPRefusal) in try a.arithmetic(.add, Mem(base: .rbx, displacement: 8), .rax) },
    Shape(text: "sub r8, qword ptr [rip + 0xff9]", length: 7) { a throws(DMPRefusal) in try a.arithmetic(.sub, .r8, .at(data)) },
    Shape(text: "test rax, rax", length: 3) { a throws(DMPRefusal) in try a.test(.rax, .rax) },
    Shape(text: "test dword ptr [rip + 0xff6], 1", length: 10) { a throws(DMPRefusal) in try a.test(.at(data), width: 4, immediate: 1) },
    Shape(text: "test byte ptr [rbx], 0x20", length: 3) { a throws(DMPRefusal) in try a.test(Mem(base: .rbx), width: 1, immediate: 0x20) },
    Shape(text: "inc qword ptr [rip + 0xff9]", length: 7) { a throws(DMPRefusal) in try a.inc(.at(data), width: 8) },
    Shape(text: "inc dword ptr [rax]", length: 2) { a throws(DMPRefusal) in try a.inc(Mem(base: .rax), width: 4) },
    Shape(text: "inc r9d", length: 3) { a throws(DMPRefusal) in try a.inc(.r9d) },
    Shape(text: "dec r9d", length: 3) { a throws(DMPRefusal) in try a.dec(.r9d) },
    Shape(text: "shl rsi, 0x20", length: 4) { a throws(DMPRefusal) in try a.shl(.rsi, 32) },
    Shape(text: "shr eax, 8", length: 3) { a throws(DMPRefusal) in try a.shr(.eax, 8) },
    Shape(text: "lock cmpxchg qword ptr [rcx], rdx", length: 5) { a throws(DMPRefusal) in try a.lockCmpxchg(Mem(base: .rcx), .rdx) },
    Shape(text: "lock cmpxchg qword ptr [rip + 0xff7], r10", length: 9) { a throws(DMPRefusal) in try a.lockCmpxchg(.at(data), .r10) },
    Shape(text: "shrd rax, rdx, 0x10", length: 5) { a throws(DMPRefusal) in try a.shrd(.rax, .rdx, 16) },
    Shape(text: "shrd r9d, eax, 3", length: 5) { a throws(DMPRefusal) in try a.shrd(.r9d, .eax, 3) },
    Shape(text: "mul r11", length: 3) { a throws(DMPRefusal) in try a.mul(.r11) },
    Shape(text: "mul rcx", length: 3) { a throws(DMPRefusal) in try a.mul(.rcx) },
    Shape(text: "rdtsc", length: 2) { a throws(DMPRefusal) in a.rdtsc() },
    Shape(text: "pause", length: 2) { a throws(DMPRefusal) in a.pause() },
    Shape(text: "in al, dx", length: 1) { a throws(DMPRefusal) in try a.inDX(width: 1) },
    Shape(text: "in ax, dx", length: 2) { a throws(DMPRefusal) in try a.inDX(width: 2) },
    Shape(text: "in eax, dx", length: 1) { a throws(DMPRefusal) in try a.inDX(width: 4) },
    Shape(text: "in al, 0x60", length: 2) { a throws(DMPRefusal) in try a.inPort(width: 1, port: 0x60) },
    Shape(text: "in eax, 0x70", length: 2) { a throws(DMPRefusal) in try a.inPort(width: 4, port: 0x70) },
    Shape(text: "out dx, al", length: 1) { a throws(DMPRefusal) in try a.outDX(width: 1) },
    Shape(text: "out dx, ax", length: 2) { a throws(DMPRefusal) in try a.outDX(width: 2) },
    Shape(text: "out 0x80, al", length: 2) { a throws(DMPRefusal) in try a.outPort(width: 1, port: 0x80) },
    Shape(text: "out 0x80, ax", length: 3) { a throws(DMPRefusal) in try a.outPort(width: 2, port: 0x80) },
    Shape(text: "jmp 0x200100", length: 5) { a throws(DMPRefusal) in try a.jmp(.absolute(origin + 0x100)) },
    Shape(text: "jne 0x1ff000", length: 6) { a throws(DMPRefusal) in try a.jcc(.ne, .absolute(origin - 0x1000)) },
    Shape(text: "call 0x200005", length: 5) { a throws(DMPRefusal) in try a.call(.absolute(origin + 5)) },
]

/// Emits `shape` alone at ``origin`` and decodes it.
func decodeShape(_ shape: Shape) throws -> (bytes: [UInt8], decoded: [X86Instruction]) {
    var a = X86Assembler(origin: origin)
    try shape.emit(&a)
    let bytes = try a.finish()
    return (bytes, try X86Disassembler().decodeAll(bytes, address: origin))
}

@Suite struct X86AssemblerTests {
    @Test("every instruction shape decodes back to itself, with the expected length", arguments: shapes)
    func roundTrip(shape: Shape) throws {
        let (bytes, decoded) = try decodeShape(shape)
        #expect(decoded.count == 1, "\(bytes.map { String($0, radix: 16) }) decodes to \(decoded)")
        #expect(decoded.first?.description == shape.text, "\(bytes.map { String($0, radix: 16) })")
        #expect(bytes.count == shape.length && decoded.first?.length == shape.length)
    }

    @Test("RIP-relative operands name the absolute address whatever instruction they are in")
    func ripRelativeTargets() throws {
        for shape in shapes where shape.text.contains("rip") {
            let (_, decoded) = try decodeShape(shape)
            guard let i = decoded.first, let m = i.memoryOperands.first?.memory else { Issue.record("\(shape)"); continue }
            #expect(i.nextAddress &+ UInt64(bitPattern: m.displacement) == data, "\(shape)")
        }
    }

    @Test("multi-byte NOPs of 1 to 9 bytes decode as one nop each; longer padding as the fewest")
    func nops() throws {
        let d = try X86Disassembler()
        for n in 1...9 {
            var a = X86Assembler(origin: origin)
            a.nop(n)
            let i = d.decodeAll(try a.finish(), address: origin)
            #expect(i.count == 1 && i[0].length == n && i[0].mnemonic == "nop", "\(n): \(i)")
        }
        #expect(X86Assembler.nops[4] == [0x0f, 0x1f, 0x44, 0x00, 0x00])
        var a = X86Assembler(origin: origin)
        a.nop(23)
        #expect(d.decodeAll(try a.finish(), address: origin).map(\.length) == [9, 9, 5])
    }

    @Test("labels bound before and after their jumps resolve to their addresses")
    func labels() throws {
        var a = X86Assembler(origin: origin)
        let back = a.newLabel(), forward = a.newLabel()
        try a.bind(back)
        a.pause()
        try a.jcc(.ne, .label(forward))
        try a.jmp(.label(back))
        try a.bind(forward)
        a.nop(1)
        let bytes = try a.finish()
        let i = try X86Disassembler().decodeAll(bytes, address: origin)
        #expect(i.map(\.mnemonic) == ["pause", "jne", "jmp", "nop"])
        #expect(i[1].branch?.target == a.address(of: forward) && i[1].branch?.target == origin + 13)
        #expect(i[2].branch?.target == origin && a.address(of: back) == origin)
    }

    @Test("operands the encoder cannot encode are refused with a reason, not emitted")
    func refusals() throws {
        var a = X86Assembler(origin: origin)
        let unbound = a.newLabel()
        try a.jmp(.label(unbound))
        #expect(throws: DMPRefusal.self) { try a.finish() }
        var b = X86Assembler(origin: origin)
        let far: UInt64 = origin + (1 << 31) + 64
        let cases: [(String, (inout X86Assembler) throws(DMPRefusal) -> Void)] = [
            ("rip beyond 2 GiB", { a throws(DMPRefusal) in try a.mov(.eax, .at(far)) }),
            ("jmp beyond 2 GiB", { a throws(DMPRefusal) in try a.jmp(.absolute(far)) }),
            ("high byte with REX", { a throws(DMPRefusal) in try a.mov(.ah, .sil) }),
            ("high byte with r8", { a throws(DMPRefusal) in try a.mov(.ah, Mem(base: .r8)) }),
            ("rsp index", { a throws(DMPRefusal) in try a.mov(.eax, Mem(base: .rax, index: .rsp)) }),
            ("32-bit base", { a throws(DMPRefusal) in try a.mov(.eax, Mem(base: .eax)) }),
            ("width mismatch", { a throws(DMPRefusal) in try a.mov(.eax, .bx) }),
            ("64-bit immediate store", { a throws(DMPRefusal) in try a.mov(Mem(base: .rax), width: 8, immediate: 1 << 40) }),
            ("imm too wide", { a throws(DMPRefusal) in try a.cmp(.dx, immediate: 0x1_0000) }),
            ("push r32", { a throws(DMPRefusal) in try a.push(.eax) }),
            ("cmpxchg r32", { a throws(DMPRefusal) in try a.lockCmpxchg(Mem(base: .rcx), .edx) }),
            ("io width", { a throws(DMPRefusal) in try a.inDX(width: 8) }),
            ("movzx 32", { a throws(DMPRefusal) in try a.movzx(.rax, Mem(base: .rax), width: 4) }),
            ("bind twice", { a throws(DMPRefusal) in let l = a.newLabel(); try a.bind(l); try a.bind(l) }),
        ]
        for (name, emit) in cases {
            let before = b.bytes.count
            do { try emit(&b); Issue.record("\(name) was encoded") } catch {
                #expect(error.stage == .encode, "\(name)")
            }
            #expect(b.bytes.count == before, "\(name) left bytes behind")
        }
    }
}

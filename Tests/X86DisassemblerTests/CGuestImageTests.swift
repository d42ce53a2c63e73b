import Testing
import VMMKit
@testable import X86Disassembler

/// The guests written in C (`Guests/c-*.c`, gcc -O2). Issue 6 wants them
/// committed before DMP works on them and never reshaped afterwards: these
/// tests pin the images and the hot I/O instructions Guests/README.md lists.
@Suite("The committed guests written in C")
struct CGuestImageTests {
    /// FNV-1a 64 of each image as first committed (19838f1).
    static let frozen: [(String, UInt64)] = [
        ("c-uart-cpl3", 0x5f2d_db24_f463_e184), ("c-doorbell-cpl3", 0x4f1f_d24a_e435_686d),
        ("c-selfmod-cpl3", 0xfa72_a8fe_9504_e40a),
        // Written in styles of their own (runtimes, table-driven drivers), committed before DMP work on them.
        ("c-table-cpl3", 0x26de_a7af_45f2_6e01), ("c-mmio-cpl3", 0x13ea_2776_df1c_49d5),
        ("c-boot-cpl3", 0x4d31_460d_d5a9_9ad7),
        // c-uart-cpl3's source and runtime left at CPL0, committed before DMP's work on CPL0 C code.
        ("c-uart-cpl0", 0x6af8_e340_e54d_d358),
        // Built with other flags for DMP's flag sweep: a distribution's defaults (CET, PIE), -Os.
        ("c-table-cpl3-cet", 0xb1cb_e60e_2c05_c088), ("c-poll-cpl3-Os", 0x01e7_ffe9_e9db_50c2),
        ("c-console-cpl3-Os", 0x741c_e765_78f9_7e3d),
        // c-mmio-cpl3 at -O1: its DOORBELL stores in a function reached only from a function DMP copies first.
        ("c-mmio-cpl3-O1", 0x3278_2e93_91cd_b058),
        // The MMIO style sweep's index guest at -Os: a callee copied before its caller, whose copy is rebuilt.
        ("c-mmio-index-cpl3-Os", 0x2a82_606a_dfa5_9541),
        // The MMIO style sweep: one hot loop mixing a 9-byte DOORBELL store with short UART port I/O.
        ("c-mmio-mixed-cpl3", 0x94ec_9bb8_9a60_565c),
        // Written for DMP's style sweep: port accessors reached through pointers from several callers.
        ("c-portops-cpl3", 0x3dae_582e_75e7_cbd0),
        // The style sweep at -O0: one out-of-line outb writing the THR and, less often, port 0x80.
        ("c-manyloops-cpl3-O0", 0x1558_48c8_a530_8384),
        // STATUS read at 1, 2, 4 and 8 bytes, a byte DOORBELL store, stores into reserved registers.
        ("c-mmio-widths-cpl3", 0x6eff_7c79_4ac7_81f2),
        // Polling loops with timeouts, CONTROL read-modify-write sequences, an `orl` on DOORBELL.
        ("c-mmio-poll-cpl3", 0x5516_9a17_c3aa_0eca),
        // Linked packed (code, read-only data, data, bss), committed before DMP's guard rules were made precise:
        // the hot code's page holds read-only data; in the -data image, written data and the GDT.
        ("c-packed-cpl3", 0xb113_a812_0239_b9d4), ("c-packed-cpl3-data", 0x3e6b_f9cf_3e64_a868),
        // c-portops-cpl3 with statistics in its accessors, no padding between functions (-falign-functions=1).
        ("c-portstat-cpl3-noalign", 0x2109_9706_1bc9_4fd3),
        // An early console through an ops table, no padding between functions: uart_putc's one way into a copy of
        // its own lies on its rarely taken '\n' -> "\r\n" path.
        ("c-consoleops-cpl3-noalign", 0x8e39_18d5_fb54_ead5),
        // A higher-half kernel (code linked at 0xffffffff80100000, loaded at 1 MiB), committed before DMP's work on it.
        ("c-higher-cpl3", 0x49fb_f0d7_74ea_0c83),
        // c-doorbell-cpl3 at -O3 -funroll-loops (the flag sweep): DOORBELL stores back to back, committed before DMP work on it.
        ("c-doorbell-cpl3-unroll", 0x9443_3eb2_ba8b_f813),
        // c-doorbell-cpl3 as a distribution builds with LTO (PIE, stack protector, unwind tables, CET): db_run
        // crosses a page boundary inside a 5-byte instruction. Committed before DMP work on it.
        ("c-doorbell-cpl3-ubuntu-lto", 0x37c2_7abd_89b9_2566),
        // Real MMIO drivers' idioms on the doorbell, from memory: virtio-mmio's notify callback, NVMe's strided
        // submission doorbell with a CQ-head doorbell that has no fast path.
        ("c-virtio-notify-cpl3", 0x004e_5ef9_cacf_a30a), ("c-nvme-sqdb-cpl3", 0xb033_fcca_636e_afdd),
    ]

    static func image(_ name: String) throws -> (file: [UInt8], elf: ELFImage) {
        let file = try ImageFile.read(GuestImageTests.guests + "/" + name + ".elf")
        return (file, try ELFImage(bytes: file))
    }

    /// The instructions of function `symbol` of image `name`, decoded whole.
    static func function(_ name: String, _ symbol: String) throws -> [X86Instruction] {
        let (file, elf) = try image(name)
        let sym = try #require(elf.symbols.symbols.first { $0.name == symbol && $0.isFunction && $0.size > 0 })
        let seg = try #require(elf.segments.first { $0.executable && sym.address >= $0.virtualAddress
                                                   && sym.address + sym.size <= $0.virtualAddress + $0.fileSize })
        let start = Int(seg.fileOffset + (sym.address - seg.virtualAddress))
        return try X86Disassembler(mode: .bits64).decodeAll(Array(file[start..<start + Int(sym.size)]), address: sym.address, mode: .bits64)
    }

    @Test("the C guests are the images committed before DMP work on them began (issue 6: do not reshape them)", arguments: frozen)
    func imagesAreFrozen(name: String, hash: UInt64) throws {
        let (file, _) = try CGuestImageTests.image(name)
        let h = file.reduce(0xcbf2_9ce4_8422_2325 as UInt64) { ($0 ^ UInt64($1)) &* 0x0000_0100_0000_01b3 }
        #expect(h == hash, "Guests/\(name).elf changed (FNV-1a 64 0x\(String(h, radix: 16))): the C guests are not to be reshaped")
    }

    @Test("gcc's hot I/O instructions are where Guests/README.md says, in the forms it says", arguments: [
        ("c-uart-cpl3", "io_serial_in_slow", ["in al, dx [1]", "out 0x80, al [2]"]),
        ("c-uart-cpl3", "io_serial_out_slow", ["out dx, al [1]", "out 0x80, al [2]"]),
        ("c-doorbell-cpl3", "db_run", ["mov dword ptr [rcx + 0x40], edx [3]", "mov eax, dword ptr [rcx + 4] [3]"]),
        ("c-selfmod-cpl3", "early_serial_write", ["in al, dx [1]", "in al, dx [1]", "out dx, al [1]"]),
        // A leaf with its digits in the red zone (below RSP) while it polls the UART.
        ("c-selfmod-cpl3", "early_puthex", ["lea rdx, [rsp - 9] [5]", "in al, dx [1]", "in al, dx [1]", "out dx, al [1]"]),
        // The instruction whose immediate the guest rewrites.
        ("c-selfmod-cpl3", "line_key", ["xor eax, 0x5bd1e995 [5]"]),
        // gcc's PIC jump table with notrack (-fpie -fcf-protection=full), then the LSR read it dispatches to.
        ("c-table-cpl3-cet", "uart_read", ["lea rcx, [rip + 0x1a17] [7]", "movsxd rdx, dword ptr [rcx + rdx*4] [4]",
                                           "add rdx, rcx [3]", "jmp rdx [3]", "in al, dx [1]"]),
        // A 9-byte constant-address DOORBELL store (an instruction stub when it gets hot first), then the UART's
        // 1-byte `in`/`out` in the same loop (a function copy), the STATUS read after the loop, the newline's `in`/`out`.
        ("c-mmio-mixed-cpl3", "run", ["movabs dword ptr [0xd0000040], eax [9]", "in al, dx [1]", "out dx, al [1]",
                                      "movabs eax, dword ptr [0xd0000004] [9]", "in al, dx [1]", "out dx, al [1]"]),
        // The DOORBELL stores (dword, byte), the STATUS reads at every width, the reserved registers' store.
        ("c-mmio-widths-cpl3", "run", ["mov dword ptr [rbp], ecx [3]", "mov byte ptr [rbp], cl [3]",
                                       "movabs rax, qword ptr [0xd0000004] [10]", "mov eax, dword ptr [r15] [3]",
                                       "movabs eax, dword ptr [0xd0000004] [9]", "movabs ax, word ptr [0xd0000004] [10]",
                                       "movabs al, byte ptr [0xd0000004] [9]", "mov dword ptr [rdx], esi [2]"]),
        // CONTROL's read-modify-write sequence, then the `orl` on DOORBELL.
        ("c-mmio-poll-cpl3", "run", ["mov eax, dword ptr [rsi] [2]", "mov dword ptr [rsi], eax [2]", "or dword ptr [r13], eax [4]"]),
        // -Os: a 2-byte first instruction, the port loads before the loops, short loops.
        ("c-console-cpl3-Os", "early_console_write", ["mov edi, edx [2]", "mov r8d, 0x3fd [6]", "mov r9d, 0x3f8 [6]", "in al, dx [1]",
                                                     "je 0x10142f [2]", "out dx, al [1]", "jmp 0x10142a [2]", "ret [1]"]),
        // Out-of-line accessors reached only through uart_port's pointers, no 5-byte instruction, no padding.
        ("c-portops-cpl3", "io_serial_in_p", ["movzx edx, word ptr [rdi] [3]", "in al, dx [1]", "out 0x80, al [2]", "ret [1]"]),
        ("c-portops-cpl3", "io_serial_out", ["out dx, al [1]", "ret [1]"]),
        ("c-manyloops-cpl3-O0", "outb", ["movzx edx, word ptr [rbp - 8] [4]", "out dx, al [1]"]),
        ("c-manyloops-cpl3-O0", "inb", ["in al, dx [1]"]),
        // A branch over the statistics counter lands just before the port access; no 5-byte instruction.
        ("c-portstat-cpl3-noalign", "io_serial_in_p", ["cmp byte ptr [rdi + 8], 0 [4]", "je 0x101504 [2]", "add byte ptr [rdi + 9], 1 [4]",
                                                      "add dx, word ptr [rdi] [3]", "in al, dx [1]", "out 0x80, al [2]", "ret [1]"]),
        // uart_ready: no 5-byte instruction (uart_putc, whose name start.s's own uart_putc shares, is checked in
        // CallPromotionTests.nestedPromotion).
        ("c-consoleops-cpl3-noalign", "uart_ready", ["movzx edx, word ptr [rdi + 8] [4]", "add edx, 5 [3]", "in al, dx [1]", "ret [1]"]),
        ("c-poll-cpl3-Os", "poll_console_write", ["mov edi, edx [2]", "mov r8d, 0x3fd [6]", "mov r9d, 0x3f8 [6]", "in al, dx [1]",
                                                  "je 0x10142f [2]", "out dx, al [1]", "jmp 0x10142a [2]", "ret [1]"]),
    ])
    func hotInstructions(name: String, symbol: String, expected: [String]) throws {
        let code = try CGuestImageTests.function(name, symbol).map { "\($0.description) [\($0.length)]" }
        // `expected` appears in order within the function.
        var rest = code[...]
        for e in expected {
            guard let i = rest.firstIndex(of: e) else {
                Issue.record("\(name) \(symbol): no \(e) (in order) in \(code)")
                return
            }
            rest = rest[(i + 1)...]
        }
        let io = code.filter { $0.hasPrefix("in ") || $0.hasPrefix("out ") }
        #expect(io == expected.filter { $0.hasPrefix("in ") || $0.hasPrefix("out ") }, "every I/O instruction is listed")
    }
}

# selftest - small behaviours for the VMM's tests, chosen with test=NAME:
#   strio     rep outsb "STRINGIO\n" to 0x3f8; rep insb 8 bytes from port
#             0x702; print "insb=" and the bytes as 16 hex digits; exit 0
#   mmioread  read u32 at 0xC0000000, print "mmio=0x%08x", write it + 1 as
#             u32 to 0xC0000004; exit 0
#   rowrite   store u32 0xDEADBEEF to 0xB0000000, load it back, print
#             "ro=0x%08x"; exit 0
#   triple    load a zero-limit IDT, then ud2: triple fault
#   spin      jmp . forever at CPL0
#   smp       every vCPU (BSP and APs) loops on out dx, eax to port 0x703
#             with eax = its APIC ID, forever
# Unknown or missing test: print "selftest: unknown test", exit 1.

        .set CUSTOM_AP, 1
        .include "macros.inc"
        .include "boot.inc"
        .include "console.inc"
        .include "cmdline.inc"

.set STRIO_IN_PORT,  0x702
.set SMP_PORT,       0x703
.set MMIO_TEST_ADDR, 0xC0000000
.set RO_TEST_ADDR,   0xB0000000

        .text
FUNC kmain
        push %rbx
        push %r12
        call uart_init
        mov boot_cmdline(%rip), %rdi
        lea key_test(%rip), %rsi
        call cmdline_find
        test %rax, %rax
        jz 9f
        mov %rax, %rbx
        lea selftest_table(%rip), %r12  # (name, function) pairs, 0-terminated
1:      mov (%r12), %rsi
        test %rsi, %rsi
        jz 9f
        mov %rbx, %rdi
        call word_eq
        test %eax, %eax
        jnz 2f
        add $16, %r12
        jmp 1b
2:      mov 8(%r12), %rax
        pop %r12
        pop %rbx
        jmp *%rax                       # returns eax = exit status
9:      lea msg_unknown(%rip), %rdi
        call puts
        mov $1, %eax
        pop %r12
        pop %rbx
        ret
ENDF kmain

FUNC test_strio
        push %rbx
        lea msg_strio(%rip), %rsi
        mov $9, %ecx
        mov $UART_BASE, %edx
        rep outsb
        lea strio_buf(%rip), %rdi
        mov $8, %ecx
        mov $STRIO_IN_PORT, %edx
        rep insb
        lea msg_insb(%rip), %rdi
        call puts
        xor %ebx, %ebx
1:      lea strio_buf(%rip), %rax
        movzbl (%rax,%rbx), %edi
        mov $2, %esi
        call put_hex
        inc %ebx
        cmp $8, %ebx
        jb 1b
        mov $'\n', %edi
        call uart_putc
        xor %eax, %eax
        pop %rbx
        ret
ENDF test_strio

FUNC test_mmioread
        push %rbx
        mov $MMIO_TEST_ADDR, %eax
        mov (%rax), %ebx
        lea msg_mmio(%rip), %rdi
        call puts
        mov %ebx, %edi
        mov $8, %esi
        call put_hex
        mov $'\n', %edi
        call uart_putc
        lea 1(%rbx), %ecx
        mov $MMIO_TEST_ADDR, %eax
        mov %ecx, 4(%rax)
        xor %eax, %eax
        pop %rbx
        ret
ENDF test_mmioread

FUNC test_rowrite
        push %rbx
        mov $RO_TEST_ADDR, %eax
        movl $0xDEADBEEF, (%rax)
        mov (%rax), %ebx
        lea msg_ro(%rip), %rdi
        call puts
        mov %ebx, %edi
        mov $8, %esi
        call put_hex
        mov $'\n', %edi
        call uart_putc
        xor %eax, %eax
        pop %rbx
        ret
ENDF test_rowrite

# ud2 rather than int3: KVM's instruction emulator cannot emulate INT n in
# long mode, so on hosts that emulate CPL0 (KVM PVM) int3 ends in a KVM
# emulation failure instead of a triple fault. #UD from ud2 is raised by the
# emulator and delivered through the (empty) IDT: #UD -> #GP -> #DF -> triple
# fault, on every host.
FUNC test_triple
        lidt null_idt_ptr(%rip)
        ud2
        jmp test_triple
ENDF test_triple

FUNC test_spin
        jmp .
ENDF test_spin

# BSP: APIC ID 0.
FUNC test_smp
        xor %esi, %esi
        jmp smp_loop
ENDF test_smp

# smp_loop(esi = APIC ID): out dx, eax to port 0x703 forever.
FUNC smp_loop
        mov %esi, %eax
        mov $SMP_PORT, %edx
1:      out %eax, %dx
        jmp 1b
ENDF smp_loop

# ap_main(rdi = command line, esi = APIC ID): with test=smp, smp_loop;
# otherwise park.
FUNC ap_main
        mov %esi, %ebx
        lea key_test(%rip), %rsi
        call cmdline_find
        test %rax, %rax
        jz 9f
        mov %rax, %rdi
        lea name_smp(%rip), %rsi
        call word_eq
        test %eax, %eax
        jz 9f
        mov %ebx, %esi
        jmp smp_loop
9:      cli
        hlt
        jmp 9b
ENDF ap_main

        .section .rodata, "a", @progbits
        .balign 8
OBJ selftest_table
        .quad name_strio, test_strio
        .quad name_mmioread, test_mmioread
        .quad name_rowrite, test_rowrite
        .quad name_triple, test_triple
        .quad name_spin, test_spin
        .quad name_smp, test_smp
        .quad 0, 0
ENDO selftest_table
OBJ null_idt_ptr
        .word 0
        .quad 0
ENDO null_idt_ptr
OBJ key_test
        .asciz "test="
ENDO key_test
OBJ name_strio
        .asciz "strio"
ENDO name_strio
OBJ name_mmioread
        .asciz "mmioread"
ENDO name_mmioread
OBJ name_rowrite
        .asciz "rowrite"
ENDO name_rowrite
OBJ name_triple
        .asciz "triple"
ENDO name_triple
OBJ name_spin
        .asciz "spin"
ENDO name_spin
OBJ name_smp
        .asciz "smp"
ENDO name_smp
OBJ msg_strio
        .ascii "STRINGIO\n"
ENDO msg_strio
OBJ msg_insb
        .asciz "insb="
ENDO msg_insb
OBJ msg_mmio
        .asciz "mmio=0x"
ENDO msg_mmio
OBJ msg_ro
        .asciz "ro=0x"
ENDO msg_ro
OBJ msg_unknown
        .asciz "selftest: unknown test\n"
ENDO msg_unknown

        .bss
OBJ strio_buf
        .skip 8
ENDO strio_buf

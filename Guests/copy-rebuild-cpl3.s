# copy-rebuild-cpl3 - a CPL3 UART loop whose hot function gains a second
# exiting instruction only later (DMP's function-copy rebuild). Every byte
# goes through putc_delay: wait for LSR.THRE, write THR, then, once the delay
# is switched on, a port-0x80 delay write. The first half of the lines run with
# the delay off: DMP copies putc_delay for its LSR and THR sites, and the
# port-0x80 write, never executed, is no sibling. The second half runs with
# the delay on: the port-0x80 write becomes hot inside the copy, and DMP
# rebuilds the copy with it served too. Prints `rebuild line XXXX` lines and
# `done`, exits 0.
# Command line: lines=N (default 600).

        .set USER_LOW, 1
        .include "macros.inc"
        .include "boot.inc"
        .include "console.inc"
        .include "cmdline.inc"

        .text
FUNC kmain
        call uart_init
        lea key_lines(%rip), %rdi
        mov $600, %esi
        call cmdline_num
        mov %eax, cfg_lines(%rip)
        lea user_main(%rip), %rdi
        jmp enter_user
ENDF kmain

# putc_delay(dil = byte): wait for THR empty, write THR, then a port-0x80
# delay write while delay_on is set. Clobbers eax, edx. The first instruction
# is 5 bytes long.
FUNC putc_delay
        mov $UART_LSR, %edx
1:      in %dx, %al
        test $0x20, %al
        jz 1b
        mov %edi, %eax
        mov $UART_BASE, %edx
        out %al, %dx
        cmpl $0, delay_on(%rip)
        je 2f
        out %al, $0x80
2:      ret
ENDF putc_delay

# print_line(edi = i): `rebuild line ` and i in four hex digits, then a newline.
FUNC print_line
        push %rbx
        push %r12
        mov %edi, %r12d
        lea str_line(%rip), %rbx
1:      movzbl (%rbx), %edi
        test %edi, %edi
        jz 2f
        call putc_delay
        inc %rbx
        jmp 1b
2:      mov $12, %ebx
3:      mov %r12d, %edi
        mov %ebx, %ecx
        shr %cl, %edi
        and $15, %edi
        lea hex_digits(%rip), %rax
        movzbl (%rax,%rdi), %edi
        call putc_delay
        sub $4, %ebx
        jns 3b
        mov $'\n', %edi
        call putc_delay
        pop %r12
        pop %rbx
        ret
ENDF print_line

# CPL3: lines 0..N-1, the delay switched on at line N/2.
FUNC user_main
        xor %ebx, %ebx
1:      mov cfg_lines(%rip), %eax
        shr $1, %eax
        cmp %eax, %ebx
        jne 2f
        movl $1, delay_on(%rip)
2:      mov %ebx, %edi
        call print_line
        inc %ebx
        cmp cfg_lines(%rip), %ebx
        jb 1b
        lea str_done(%rip), %rdi
        call puts
        xor %edi, %edi
        jmp guest_exit
ENDF user_main

        .section .rodata, "a", @progbits
OBJ key_lines
        .asciz "lines="
ENDO key_lines
OBJ str_line
        .asciz "rebuild line "
ENDO str_line
OBJ str_done
        .asciz "done\n"
ENDO str_done

        .bss
        .balign 4
OBJ cfg_lines
        .skip 4
ENDO cfg_lines
OBJ delay_on
        .skip 4
ENDO delay_on

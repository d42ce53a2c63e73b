# uart-cpl3 - workload (b): the uart-cpl0 loop run at CPL3. The kernel drops
# to user mode with IOPL 3 (and a TSS I/O bitmap allowing ports 0-0x7ff); the
# low 16 MiB (the whole image, and the reserved ring/implant area at 0xE00000)
# are user-accessible. The user code runs the loop, prints RESULT and exits
# through the debug-exit port itself.
# Command line: iters=N (default 200) warmup=W (default N/10).

        .ifndef PV
        .set PV, 0
        .endif
        .set USER_LOW, 1
        .include "macros.inc"
        .include "boot.inc"
        .include "console.inc"
        .include "cmdline.inc"
        .include "fnv.inc"
        .include "bench.inc"
        .if PV
        .include "ring.inc"
        .endif
        .include "uart_workload.inc"

        .text
FUNC kmain
        call uart_init
        .if PV
        mov $PVRING0, %edi
        call pvring_check
        .endif
        mov $200, %edi
        mov $1, %esi
        call bench_config
        lea user_main(%rip), %rdi
        jmp enter_user
ENDF kmain

# CPL3.
FUNC user_main
        call uart_workload
        xor %edi, %edi
        jmp guest_exit
ENDF user_main

        .section .rodata, "a", @progbits
OBJ workload_name
        .if PV
        .asciz "uart-cpl3-pv"
        .else
        .asciz "uart-cpl3"
        .endif
ENDO workload_name

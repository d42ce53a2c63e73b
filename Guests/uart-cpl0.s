# uart-cpl0 - workload (a): console lines through the 8250 UART at CPL0.
# Command line: iters=N (default 200) warmup=W (default N/10).

        .ifndef PV
        .set PV, 0
        .endif
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
        call uart_workload
        xor %eax, %eax
        ret
ENDF kmain

        .section .rodata, "a", @progbits
OBJ workload_name
        .if PV
        .asciz "uart-cpl0-pv"
        .else
        .asciz "uart-cpl0"
        .endif
ENDO workload_name

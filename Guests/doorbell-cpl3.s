# doorbell-cpl3 - workload (c): doorbell requests from CPL3. The kernel checks
# the device ID, sets up a 256-entry completion queue, enables the device and
# drops to user mode (as uart-cpl3) with the doorbell page user-accessible
# too; the user code submits N requests in batches of 16, reads STATUS once
# per batch and consumes the completions from the CQ.
# Command line: iters=N (default 4096, a multiple of 16) warmup=W (default
# N/10 rounded down to a multiple of 16).

        .ifndef PV
        .set PV, 0
        .endif
        .set USER_LOW, 1
        .set USER_DOORBELL, 1
        .include "macros.inc"
        .include "boot.inc"
        .include "console.inc"
        .include "cmdline.inc"
        .include "fnv.inc"
        .include "bench.inc"
        .if PV
        .include "ring.inc"
        .endif
        .include "doorbell_workload.inc"

        .text
FUNC kmain
        call uart_init
        call doorbell_probe
        .if PV
        mov $PVRING1, %edi
        call pvring_check
        .endif
        mov $4096, %edi
        mov $DB_BATCH, %esi
        call bench_config
        call doorbell_setup
        lea user_main(%rip), %rdi
        jmp enter_user
ENDF kmain

# CPL3.
FUNC user_main
        call doorbell_workload
        xor %edi, %edi
        jmp guest_exit
ENDF user_main

        .section .rodata, "a", @progbits
OBJ workload_name
        .if PV
        .asciz "doorbell-cpl3-pv"
        .else
        .asciz "doorbell-cpl3"
        .endif
ENDO workload_name

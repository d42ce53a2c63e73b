# smp-cpl3 - two vCPUs, both busy at CPL3 the whole time, each calling its own
# port I/O sites in turn: DMP's hot-to-patched latency with a second vCPU
# that is running guest code (not parked in hlt) when a patch pauses it.
#
# The BSP (APIC ID 0) and the first AP (APIC ID 1) each drop to CPL3 with
# IOPL 3 (the AP loads a TSS of its own, with the same I/O bitmap, for
# hypervisors that drop a guest's user IOPL), meet, and run smp_worker:
# for each of S sites (phases), N calls of that vCPU's site function through
# a table, folding each returned value into an FNV-1a hash, then K rounds of
# arithmetic on the hash (guest work that never exits: once a site is patched
# the vCPU runs in the guest until its next site). Site k of vCPU c
# is a function of its own (a 5-byte first instruction, then one port
# access): LSR reads (in al, dx from 0x3fd, a constant while the UART is
# idle) where k + c is even, port-0x80 delay writes (out dx, al) where it is
# odd, so the two vCPUs hit distinct sites of both kinds at once. Each site
# function sits in a 1 KiB slot of its own (int3 filled), four to a page:
# site k of both vCPUs share a page with site k^1's. After its last phase the
# AP publishes its hash and spins (pause) at CPL3 until the VM ends; the BSP
# waits for it, prints
#   RESULT workload=smp-cpl3 sites=S iters=N spin=K checksum0=0x... checksum1=0x... checksum=0x...
# (checksum: FNV-1a of both hashes) and exits 0. Without a second vCPU it
# prints "smp: no second vCPU" and exits 2 (after ~2^33 TSC cycles).
# Command line: sites=S (1-12, default 12) iters=N (default 4096) spin=K
# (default 1000) shared=B (default 0): with shared=1 the AP calls the BSP's
# site functions too, so both vCPUs run the same site (and DMP the same
# implanted body) at once: each site is then called 2N times in all, and
# checksum1 equals checksum0. lockstep=B (default 0): with lockstep=1 each
# vCPU, after each phase, publishes the phases it has done and waits
# (spinning at CPL3, no exit) until the other has done as many, so both run
# phase k together however the host schedules their threads (same output).

        .set USER_LOW, 1
        .set CUSTOM_AP, 1
        .include "macros.inc"
        .include "boot.inc"
        .include "console.inc"
        .include "cmdline.inc"
        .include "fnv.inc"
        .include "ap_user.inc"

.set SMP_SITES_MAX, 12
.set SMP_WAIT_SHIFT, 33                 # TSC cycles the BSP waits for the AP: 2^33

        .text
# kmain (BSP, CPL0): UART, configuration, then CPL3 at user_main.
FUNC kmain
        call uart_init
        lea key_sites(%rip), %rdi
        mov $SMP_SITES_MAX, %esi
        call cmdline_num
        cmp $1, %rax
        jae 1f
        mov $1, %eax
1:      cmp $SMP_SITES_MAX, %rax
        jbe 2f
        mov $SMP_SITES_MAX, %eax
2:      mov %eax, cfg_sites(%rip)
        lea key_iters(%rip), %rdi
        mov $4096, %esi
        call cmdline_num
        cmp $1, %rax
        jae 3f
        mov $1, %eax
3:      mov $0xffffffff, %ecx
        cmp %rcx, %rax
        jbe 4f
        mov %ecx, %eax
4:      mov %eax, cfg_iters(%rip)
        lea key_spin(%rip), %rdi
        mov $1000, %esi
        call cmdline_num
        mov $0xffffffff, %ecx
        cmp %rcx, %rax
        jbe 5f
        mov %ecx, %eax
5:      mov %eax, cfg_spin(%rip)
        lea key_shared(%rip), %rdi
        xor %esi, %esi
        call cmdline_num
        mov %eax, cfg_shared(%rip)
        lea key_lockstep(%rip), %rdi
        xor %esi, %esi
        call cmdline_num
        mov %eax, cfg_lockstep(%rip)
        lea user_main(%rip), %rdi
        jmp enter_user
ENDF kmain

# ap_main(rdi = command line, esi = APIC ID), CPL0: APIC ID 1 loads its own
# GDT copy and TSS and drops to CPL3 at ap_user_main; other APs park.
FUNC ap_main
        cmp $1, %esi
        jne 9f
        AP_ENTER_USER ap_user_main, ap_user_stack_top
9:      cli
        hlt
        jmp 9b
ENDF ap_main

# CPL3, BSP: wait (bounded) for the AP, start both workers, wait for the
# AP's hash, print the RESULT line, exit.
FUNC user_main
        push %rbx
        push %r12
        rdtsc
        shl $32, %rdx
        or %rdx, %rax
        mov %rax, %rbx                  # rbx = start
1:      cmpl $0, ap_ready(%rip)
        jne 2f
        pause
        rdtsc
        shl $32, %rdx
        or %rdx, %rax
        sub %rbx, %rax
        shr $SMP_WAIT_SHIFT, %rax
        jz 1b
        lea msg_no_ap(%rip), %rdi
        call puts
        mov $2, %edi
        jmp guest_exit
2:      movl $1, smp_go(%rip)
        xor %edi, %edi
        call smp_worker
        mov %eax, %r12d                 # r12d = checksum0
3:      cmpl $0, ap_done(%rip)
        jne 4f
        pause
        jmp 3b
4:      lea str_result(%rip), %rdi
        call puts
        mov cfg_sites(%rip), %edi
        call put_dec
        lea str_iters(%rip), %rdi
        call puts
        mov cfg_iters(%rip), %edi
        call put_dec
        lea str_spin(%rip), %rdi
        call puts
        mov cfg_spin(%rip), %edi
        call put_dec
        lea str_checksum0(%rip), %rdi
        call puts
        mov %r12d, %edi
        mov $8, %esi
        call put_hex
        lea str_checksum1(%rip), %rdi
        call puts
        mov ap_checksum(%rip), %edi
        mov $8, %esi
        call put_hex
        lea str_checksum(%rip), %rdi
        call puts
        mov $FNV_OFFSET, %ebx
        mov %r12d, %eax
        FNV_U32 %ebx, %eax, %ecx
        mov ap_checksum(%rip), %eax
        FNV_U32 %ebx, %eax, %ecx
        mov %ebx, %edi
        mov $8, %esi
        call put_hex
        mov $'\n', %edi
        call uart_putc
        xor %edi, %edi
        pop %r12
        pop %rbx
        jmp guest_exit
ENDF user_main

# CPL3, AP: say it is ready, wait for the BSP's go, run its worker, publish
# the hash, spin until the VM ends.
FUNC ap_user_main
        movl $1, ap_ready(%rip)
1:      cmpl $0, smp_go(%rip)
        jne 2f
        pause
        jmp 1b
2:      mov $1, %edi
        call smp_worker
        mov %eax, ap_checksum(%rip)
        movl $1, ap_done(%rip)
3:      pause
        jmp 3b
ENDF ap_user_main

# smp_worker(edi = vCPU 0 or 1) -> eax: for each of cfg_sites phases k,
# cfg_iters calls of site k of this vCPU (edi = the call's index), each
# result folded into an FNV-1a hash, then cfg_spin rounds of arithmetic on it;
# with cfg_lockstep, a barrier with the other vCPU after each phase.
FUNC smp_worker
        push %rbx
        push %r12
        push %r13
        push %r14
        push %r15
        mov %edi, %r15d
        shl $6, %r15d                   # r15 = this vCPU's line of smp_phases
        mov $FNV_OFFSET, %r12d
        lea smp_site_table(%rip), %r13
        cmpl $0, cfg_shared(%rip)
        je 6f
        xor %edi, %edi                  # shared=1: vCPU 0's sites
6:      imul $SMP_SITES_MAX * 8, %edi, %edi
        add %rdi, %r13                  # r13 = this vCPU's sites
        xor %r14d, %r14d                # r14 = phase
1:      cmp cfg_sites(%rip), %r14d
        jae 3f
        xor %ebx, %ebx                  # ebx = call index
2:      mov %ebx, %edi
        call *(%r13,%r14,8)
        FNV_U32 %r12d, %eax, %ecx
        mov cfg_spin(%rip), %ecx
        test %ecx, %ecx
        jz 5f
4:      imul $FNV_PRIME, %r12d, %r12d
        add %ecx, %r12d
        dec %ecx
        jnz 4b
5:      inc %ebx
        cmp cfg_iters(%rip), %ebx
        jb 2b
        inc %r14d
        cmpl $0, cfg_lockstep(%rip)
        je 1b
        lea smp_phases(%rip), %rax
        mov %r14d, (%rax,%r15)          # the phases this vCPU has done
        mov %r15, %rcx
        xor $64, %rcx                   # the other vCPU's line
7:      cmp %r14d, (%rax,%rcx)
        jae 1b
        pause
        jmp 7b
3:      mov %r12d, %eax
        pop %r15
        pop %r14
        pop %r13
        pop %r12
        pop %rbx
        ret
ENDF smp_worker

# Site functions: SITE cpu, k, in or out. Each takes edi (the call index)
# and returns the byte the access saw (in: the LSR; out: the byte written)
# xored with a salt of its own. First instruction: 5 bytes.
.macro SITE cpu, k, dir
        .balign 1024, 0xcc
FUNC smp_site_\cpu\()_\k
        .if \dir == 0
        mov $UART_LSR, %edx
        mov %edi, %eax
        in %dx, %al
        .else
        mov $0x80, %edx
        mov %edi, %eax
        out %al, %dx
        .endif
        movzbl %al, %eax
        xor $(0x5a00 + \cpu * 0x100 + \k), %eax
        ret
ENDF smp_site_\cpu\()_\k
.endm

# Site k of vCPU c reads the LSR when k + c is even, writes port 0x80 when odd.
.macro SITE_PAIR k
        SITE 0, \k, (\k & 1)
        SITE 1, \k, ((\k + 1) & 1)
.endm

        SITE_PAIR 0
        SITE_PAIR 1
        SITE_PAIR 2
        SITE_PAIR 3
        SITE_PAIR 4
        SITE_PAIR 5
        SITE_PAIR 6
        SITE_PAIR 7
        SITE_PAIR 8
        SITE_PAIR 9
        SITE_PAIR 10
        SITE_PAIR 11
        .balign 1024, 0xcc

        .section .rodata, "a", @progbits
        .balign 8
OBJ smp_site_table
        .quad smp_site_0_0, smp_site_0_1, smp_site_0_2, smp_site_0_3
        .quad smp_site_0_4, smp_site_0_5, smp_site_0_6, smp_site_0_7
        .quad smp_site_0_8, smp_site_0_9, smp_site_0_10, smp_site_0_11
        .quad smp_site_1_0, smp_site_1_1, smp_site_1_2, smp_site_1_3
        .quad smp_site_1_4, smp_site_1_5, smp_site_1_6, smp_site_1_7
        .quad smp_site_1_8, smp_site_1_9, smp_site_1_10, smp_site_1_11
ENDO smp_site_table
OBJ key_sites
        .asciz "sites="
ENDO key_sites
OBJ key_iters
        .asciz "iters="
ENDO key_iters
OBJ key_spin
        .asciz "spin="
ENDO key_spin
OBJ key_shared
        .asciz "shared="
ENDO key_shared
OBJ key_lockstep
        .asciz "lockstep="
ENDO key_lockstep
OBJ msg_no_ap
        .asciz "smp: no second vCPU\n"
ENDO msg_no_ap
OBJ str_result
        .asciz "RESULT workload=smp-cpl3 sites="
ENDO str_result
OBJ str_iters
        .asciz " iters="
ENDO str_iters
OBJ str_spin
        .asciz " spin="
ENDO str_spin
OBJ str_checksum0
        .asciz " checksum0=0x"
ENDO str_checksum0
OBJ str_checksum1
        .asciz " checksum1=0x"
ENDO str_checksum1
OBJ str_checksum
        .asciz " checksum=0x"
ENDO str_checksum

        .data
        AP_USER_DATA

        .balign 4
OBJ cfg_sites
        .long SMP_SITES_MAX
ENDO cfg_sites
OBJ cfg_iters
        .long 4096
ENDO cfg_iters
OBJ cfg_spin
        .long 1000
ENDO cfg_spin
OBJ cfg_shared
        .long 0
ENDO cfg_shared
OBJ cfg_lockstep
        .long 0
ENDO cfg_lockstep
# Flags and the AP's hash, each on a cache line of its own.
        .balign 64
OBJ ap_ready
        .long 0
ENDO ap_ready
        .balign 64
OBJ smp_go
        .long 0
ENDO smp_go
        .balign 64
OBJ ap_done
        .long 0
ENDO ap_done
        .balign 64
OBJ ap_checksum
        .long 0
ENDO ap_checksum
# lockstep=1: the phases each vCPU has done (vCPU c's at smp_phases + 64c).
        .balign 64
OBJ smp_phases
        .long 0
        .balign 64
        .long 0
ENDO smp_phases

        .bss
        AP_USER_STACK

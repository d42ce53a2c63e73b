# start.s - the boot path of the guests written in C: the assembly boot code
# of include/boot.inc (PVH entry, long mode, page tables, GDT/TSS/IDT), the
# assembly console for the exception handler, and a tiny kmain that copies
# the command line into a user-accessible buffer and drops to CPL3 (IOPL 3)
# at c_user_entry, which calls the C runtime's c_start(cmdline). Everything
# else runs at CPL3, in C (see crt.c).
#
# Assembled with --defsym USER_DOORBELL=1 for guests that drive the doorbell,
# and with --defsym KERNEL_MODE=1 for guests whose C program stays at CPL0.
#
# With --defsym SMP=1 (the SMP C guests) APIC ID 1 runs too: once the BSP has
# copied the command line it drops to CPL3 with a TSS and a user stack of its
# own (include/ap_user.inc) and calls c_start as well (at CPL0 on its kernel
# stack with KERNEL_MODE=1). Both tell themselves apart in C by their per-CPU
# data: %gs:0 holds the CPU number, GS base set at CPL0 from the APIC ID
# (CPUID at CPL3 runs on the host under kvm_pvm: it returns the host CPU's
# APIC ID). With AP_OWN_TABLES=1 as well the AP runs on page tables of its
# own, built at run time from the BSP's: the same 0-4 GiB map without the
# 2 MiB page at 14-16 MiB, which the guest does not use (a kernel whose CPUs
# map only what they use).

        .set USER_LOW, 1
.ifdef SMP
        .set CUSTOM_AP, 1
.endif
        .include "macros.inc"
        .include "boot.inc"
        .include "console.inc"
.ifdef SMP
        .include "ap_user.inc"
.endif

.set CMDLINE_MAX, 256

        .text
# kmain(rdi = command line or 0), CPL0: copy at most CMDLINE_MAX - 1 bytes of
# the command line into c_cmdline (NUL-terminated), then enter user mode.
FUNC kmain
        lea c_cmdline(%rip), %rsi
        xor %ecx, %ecx
        test %rdi, %rdi
        jz 2f
1:      movzbl (%rdi,%rcx), %eax
        test %eax, %eax
        jz 2f
        mov %al, (%rsi,%rcx)
        inc %ecx
        cmp $CMDLINE_MAX - 1, %ecx
        jb 1b
2:      movb $0, (%rsi,%rcx)
.ifdef SMP
        xor %edi, %edi
        call set_percpu
        movl $1, c_cmdline_ready(%rip)
.endif
.ifdef KERNEL_MODE
        # Assembled with --defsym KERNEL_MODE=1: the C program runs at CPL0.
c_kernel_start:
        lea c_cmdline(%rip), %rdi
        and $-16, %rsp
        call c_start
        ud2
.else
        lea c_user_entry(%rip), %rdi
        jmp enter_user
.endif
ENDF kmain

# CPL3, on the user stack (16-byte aligned): c_start(c_cmdline) never returns.
FUNC c_user_entry
        lea c_cmdline(%rip), %rdi
        call c_start
        ud2
ENDF c_user_entry

        .bss
OBJ c_cmdline
        .skip CMDLINE_MAX
ENDO c_cmdline
        .text

.ifdef SMP
# ap_main(rdi = command line, esi = APIC ID), CPL0: APIC ID 1 waits for the
# command line, then runs c_start like the BSP; other APs park.
FUNC ap_main
        cmp $1, %esi
        jne 9f
1:      pause
        cmpl $0, c_cmdline_ready(%rip)
        je 1b
        mov $1, %edi
        call set_percpu
.ifdef AP_OWN_TABLES
        # The AP's own tables: boot.inc's four page directories copied, the
        # 2 MiB page at 14-16 MiB (PD0[7]) left out, a PDPT and PML4 of its own.
        lea pd_tables(%rip), %rsi
        lea ap_pd(%rip), %rdi
        mov $2048, %ecx
3:      mov (%rsi), %rax
        mov %rax, (%rdi)
        add $8, %rsi
        add $8, %rdi
        dec %ecx
        jnz 3b
        movq $0, ap_pd + 7 * 8(%rip)
        lea ap_pd(%rip), %rax
        lea ap_pdpt(%rip), %rdi
        mov $4, %ecx
4:      lea 0x27(%rax), %rdx            # P | RW | U | A
        mov %rdx, (%rdi)
        add $4096, %rax
        add $8, %rdi
        dec %ecx
        jnz 4b
        lea ap_pdpt(%rip), %rax
        or $0x27, %rax
        mov %rax, ap_pml4(%rip)
        lea ap_pml4(%rip), %rax
        mov %rax, %cr3
.endif
.ifdef KERNEL_MODE
        jmp c_kernel_start
.else
        AP_ENTER_USER c_user_entry, ap_user_stack_top
.endif
9:      cli
        hlt
        jmp 9b
ENDF ap_main

# set_percpu(edi = CPU number), CPL0: percpu[cpu].cpu = cpu, GS base = &percpu[cpu].
FUNC set_percpu
        mov %edi, %eax
        shl $6, %eax
        lea percpu(%rip), %rdx
        add %rax, %rdx
        mov %edi, (%rdx)
        mov %edx, %eax
        shr $32, %rdx
        mov $0xC0000101, %ecx           # IA32_GS_BASE
        wrmsr
        ret
ENDF set_percpu

        .data
        AP_USER_DATA
# Per-CPU data, 64 bytes each: the CPU number first.
        .balign 64
OBJ percpu
        .fill 2 * 64, 1, 0
ENDO percpu
OBJ c_cmdline_ready
        .long 0
ENDO c_cmdline_ready

        .bss
        AP_USER_STACK
.ifdef AP_OWN_TABLES
        .balign 4096
OBJ ap_pd
        .skip 4 * 4096
ENDO ap_pd
OBJ ap_pdpt
        .skip 4096
ENDO ap_pdpt
OBJ ap_pml4
        .skip 4096
ENDO ap_pml4
.endif
        .text
.endif

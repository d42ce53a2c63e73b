# start.s - the boot path of the guests written in C: the assembly boot code
# of include/boot.inc (PVH entry, long mode, page tables, GDT/TSS/IDT), the
# assembly console for the exception handler, and a tiny kmain that copies
# the command line into a user-accessible buffer and drops to CPL3 (IOPL 3)
# at c_user_entry, which calls the C runtime's c_start(cmdline). Everything
# else runs at CPL3, in C (see crt.c).
#
# Assembled with --defsym USER_DOORBELL=1 for guests that drive the doorbell,
# and with --defsym KERNEL_MODE=1 for guests whose C program stays at CPL0.

        .set USER_LOW, 1
        .include "macros.inc"
        .include "boot.inc"
        .include "console.inc"

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
.ifdef KERNEL_MODE
        # Assembled with --defsym KERNEL_MODE=1: the C program runs at CPL0.
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

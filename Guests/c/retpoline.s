# retpoline.s - what a kernel provides to C built with retpolines
# (gcc -mindirect-branch=thunk-extern -mfunction-return=thunk-extern): the
# indirect-branch thunks __x86_indirect_thunk_<reg> in the retpoline form of
# Linux's arch/x86/lib/retpoline.S (a call to the jump, a speculation trap,
# the target written over the return address), and the return thunk
# __x86_return_thunk (ret; int3), which every `ret` of such code becomes a
# `jmp` to.
        .text
.macro THUNK reg
        .globl __x86_indirect_thunk_\reg
        .type __x86_indirect_thunk_\reg, @function
        .balign 32, 0xcc
__x86_indirect_thunk_\reg:
        call 1f
2:      pause
        lfence
        jmp 2b
        .balign 16, 0xcc
1:      mov %\reg, (%rsp)
        ret
        int3
        .size __x86_indirect_thunk_\reg, . - __x86_indirect_thunk_\reg
.endm
        THUNK rax
        THUNK rbx
        THUNK rcx
        THUNK rdx
        THUNK rsi
        THUNK rdi
        THUNK rbp
        THUNK r8
        THUNK r9
        THUNK r10
        THUNK r11
        THUNK r12
        THUNK r13
        THUNK r14
        THUNK r15

        .globl __x86_return_thunk
        .type __x86_return_thunk, @function
        .balign 32, 0xcc
__x86_return_thunk:
        ret
        int3
        .size __x86_return_thunk, . - __x86_return_thunk

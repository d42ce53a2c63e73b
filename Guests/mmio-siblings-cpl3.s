# mmio-siblings-cpl3 - a CPL3 doorbell loop whose hot function holds two MMIO
# stores with fast paths, hot at different times (DMP's function-copy rebuild
# for MMIO sites). db_ring writes a request to the doorbell's DOORBELL
# register through one of two store instructions: path 0 `mov %edi,
# DB_DOORBELL(%rax)`, path 1 `mov %edi, (%rdx)` with rdx = the register's
# address. Both are under 5 bytes: only a function copy can serve them. The
# first half of the requests take path 0: DMP copies db_ring for its store
# (the path-1 store, never executed, is no sibling). The second half
# alternate the paths: the path-1 store becomes hot inside the copy, and DMP
# rebuilds the copy with both served. After each request the loop checks its
# completion in the queue (value ^ 0x5A5A5A5A, sequence k + 1) and hashes it;
# every 1024 requests it prints `mmio line XXXX hash XXXXXXXX`. The steady
# phase (marker port) is the last quarter. Prints `done`, exits 0; exits 3
# on a wrong completion.
# Command line: iters=N (default 8192, a multiple of 1024).

        .set USER_LOW, 1
        .set USER_DOORBELL, 1
        .include "macros.inc"
        .include "boot.inc"
        .include "console.inc"
        .include "cmdline.inc"
        .include "fnv.inc"
        .include "bench.inc"

        .set SIB_LINE, 1024             # requests per printed line
        .set SIB_CQ_SIZE, 256

        .text
FUNC kmain
        call uart_init
        mov $DB_BASE, %eax
        mov DB_ID(%rax), %ecx
        cmp $DB_ID_VALUE, %ecx
        jne 1f
        lea sib_cq(%rip), %rdx          # completion queue, enabled
        mov %edx, DB_CQ_LO(%rax)
        shr $32, %rdx
        mov %edx, DB_CQ_HI(%rax)
        movl $SIB_CQ_SIZE, DB_CQ_ENTRIES(%rax)
        movl $1, DB_CONTROL(%rax)
        mov $8192, %edi
        mov $SIB_LINE, %esi
        call bench_config
        lea user_main(%rip), %rdi
        jmp enter_user
1:      lea msg_no_doorbell(%rip), %rdi
        call puts
        mov $2, %eax
        ret
ENDF kmain

# db_ring(edi = request value, esi = path): one DOORBELL write, through the
# path-0 store or the path-1 store. Clobbers eax, edx. The first instruction
# is 5 bytes long (the copy's entry).
FUNC db_ring
        mov $DB_BASE, %eax
        test %esi, %esi
        jnz 1f
        mov %edi, DB_DOORBELL(%rax)
        ret
1:      lea DB_DOORBELL(%rax), %rdx
        mov %edi, (%rdx)
        ret
ENDF db_ring

# print_line(edi = k, esi = hash): `mmio line XXXX hash XXXXXXXX`.
FUNC print_line
        push %rbx
        push %r12
        mov %edi, %ebx
        mov %esi, %r12d
        lea str_line(%rip), %rdi
        call puts
        mov %ebx, %edi
        mov $4, %esi
        call put_hex
        lea str_hash(%rip), %rdi
        call puts
        mov %r12d, %edi
        mov $8, %esi
        call put_hex
        mov $'\n', %edi
        call uart_putc
        pop %r12
        pop %rbx
        ret
ENDF print_line

# CPL3: requests 0..N-1. Request k carries k * KNUTH_MUL; path 0 in the
# first half, k & 1 in the second. Marker 1 before request 3N/4, marker 2
# after the last.
FUNC user_main
        xor %r13d, %r13d                # k
        mov $FNV_OFFSET, %r12d          # hash of the completions
1:      mov cfg_iters(%rip), %eax
        lea (%rax,%rax,2), %ecx
        shr $2, %ecx                    # 3N/4
        cmp %ecx, %r13d
        jne 2f
        call mark_start
2:      xor %esi, %esi
        shr $1, %eax                    # N/2
        cmp %eax, %r13d
        jb 3f
        mov %r13d, %esi
        and $1, %esi
3:      imul $KNUTH_MUL, %r13d, %edi
        mov %edi, %r14d
        call db_ring
        mov %r13d, %eax                 # its completion: queue[k mod size]
        and $SIB_CQ_SIZE - 1, %eax
        lea sib_cq(%rip), %rcx
        lea (%rcx,%rax,8), %rcx
        lea 1(%r13), %edx
        cmp 4(%rcx), %edx               # sequence k + 1
        jne 9f
        mov (%rcx), %eax
        xor $0x5A5A5A5A, %eax
        cmp %r14d, %eax                 # the request's value
        jne 9f
        mov (%rcx), %eax
        FNV_U32 %r12d, %eax, %ecx
        inc %r13d
        test $SIB_LINE - 1, %r13d
        jnz 4f
        mov %r13d, %edi
        mov %r12d, %esi
        call print_line
4:      cmp cfg_iters(%rip), %r13d
        jb 1b
        call mark_end
        lea str_done(%rip), %rdi
        call puts
        xor %edi, %edi
        jmp guest_exit
9:      lea msg_bad(%rip), %rdi
        call puts
        mov $3, %edi
        jmp guest_exit
ENDF user_main

        .section .rodata, "a", @progbits
OBJ str_line
        .asciz "mmio line "
ENDO str_line
OBJ str_hash
        .asciz " hash "
ENDO str_hash
OBJ str_done
        .asciz "done\n"
ENDO str_done
OBJ msg_bad
        .asciz "mmio-siblings: wrong completion\n"
ENDO msg_bad
OBJ msg_no_doorbell
        .asciz "doorbell: no device answered\n"
ENDO msg_no_doorbell

        .bss
        .balign 4096
OBJ sib_cq
        .skip SIB_CQ_SIZE * 8
ENDO sib_cq

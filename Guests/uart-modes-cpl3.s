# uart-modes-cpl3 - a CPL3 UART loop that leaves the fast paths' preconditions
# mid-stream (DMP transparency tests). Each of R rounds prints N lines through
# uart_putc (hot: DMP patches it), then, with no exit of its own in between:
#   - DLAB: sets LCR.DLAB, writes two bytes through uart_putc (they land in
#     the divisor latch, DLL, not on the wire), writes DLM, reads DLL, DLM and
#     LSR back, restores the divisor and clears DLAB;
#   - loopback: sets MCR.LOOP, writes three bytes through uart_putc (they land
#     in the receive FIFO), reads LSR, the three bytes from RBR, LSR and MSR
#     back, clears loopback;
# and prints what it read: `dlab: dll=XX dlm=XX lsr=XX` and
# `loop: lsr=XX rx=XXXXXX lsr=XX msr=XX`. Ends with `done` and exit 0.
# With scribble=1 the guest writes a different pattern over the top 16 KiB of
# the reserved implant area (DMP's data: enable words, hit counters) before
# every mode change; with scribble=2 it fills the first 16 KiB (DMP's code)
# with ud2 after the first round: bad input for DMP (the area is reserved in the
# memory map; a guest has no business there).
# With scribble=3..6 the kernel maps the paravirtual area (0xE00000-0xFFFFFF)
# through a page table of 4 KiB pages of its own (same frames, same flags) and
# sets EFER.NXE; after the first round, at CPL3 (the page tables are
# user-writable here) and without a TLB flush (CPL3 cannot flush; the shadow
# MMU sees page-table writes), the guest changes how the implant is mapped:
#   3: its first 16 KiB (DMP's code) remapped to other frames holding a copy
#      (the patched code keeps working until DMP notices);
#   4: unmapped (P clear); 5: not executable (XD set); 6: supervisor-only (U
#      clear) - each followed by 40 reads of the scratch register (exits at a
#      cold site) before the patched uart_putc runs again;
#   7: nothing (the tables split and NXE set, for tests that change them from
#      the host).
# Command line: lines=N (default 20) rounds=R (default 3) scribble=S (0).

        .set USER_LOW, 1
        .include "macros.inc"
        .include "boot.inc"
        .include "console.inc"
        .include "cmdline.inc"

        .set IMPLANT_BASE, 0xF00000
        .set IMPLANT_END,  0x1000000
        .set SCRIBBLE_SIZE, 0x4000
        .set PV_AREA, 0xE00000          # the 2 MiB page holding the rings and the implant
        .set PTE_FLAGS, 0x67            # P | RW | U | A | D
        .set IMPLANT_PTES, pv_pt + (IMPLANT_BASE - PV_AREA) / 4096 * 8

        .text
FUNC kmain
        call uart_init
        lea key_lines(%rip), %rdi
        mov $20, %esi
        call cmdline_num
        mov %eax, cfg_lines(%rip)
        lea key_rounds(%rip), %rdi
        mov $3, %esi
        call cmdline_num
        mov %eax, cfg_rounds(%rip)
        lea key_scribble(%rip), %rdi
        xor %esi, %esi
        call cmdline_num
        mov %eax, cfg_scribble(%rip)
        cmp $3, %eax
        jb 1f
        call split_pv_area
1:      lea user_main(%rip), %rdi
        jmp enter_user
ENDF kmain

# split_pv_area (CPL0): maps 0xE00000-0xFFFFFF through pv_pt, 4 KiB pages with
# the frames and flags the 2 MiB page had, and sets EFER.NXE.
FUNC split_pv_area
        lea pv_pt(%rip), %rdi
        mov $PV_AREA | PTE_FLAGS, %eax
        mov $512, %ecx
1:      mov %rax, (%rdi)
        add $8, %rdi
        add $4096, %rax
        dec %ecx
        jnz 1b
        lea pv_pt(%rip), %rax
        or $0x27, %rax                  # P | RW | U | A
        mov %rax, pd_tables + 7 * 8(%rip)
        mov $0xC0000080, %ecx           # EFER.NXE
        rdmsr
        or $0x800, %eax
        wrmsr
        mov %cr3, %rax
        mov %rax, %cr3
        ret
ENDF split_pv_area

# remap_implant(edi = mode 3..6), at CPL3: see the header.
FUNC remap_implant
        push %rbx
        mov %edi, %ebx
        cmp $3, %ebx
        jne 2f
        mov $IMPLANT_BASE, %esi         # 3: copy DMP's code and map the copy in its place
        lea implant_copy(%rip), %rdi
        mov $SCRIBBLE_SIZE / 8, %ecx
        rep movsq
        lea implant_copy(%rip), %rax
        or $PTE_FLAGS, %rax
        lea IMPLANT_PTES(%rip), %rdi
        mov $SCRIBBLE_SIZE / 4096, %ecx
1:      mov %rax, (%rdi)
        add $8, %rdi
        add $4096, %rax
        dec %ecx
        jnz 1b
        jmp 9f
2:      lea IMPLANT_PTES(%rip), %rdi    # 4, 5, 6: every implant page
        mov $(IMPLANT_END - IMPLANT_BASE) / 4096, %ecx
3:      mov (%rdi), %rax
        cmp $4, %ebx
        jne 4f
        and $~1, %rax                   # not present
        jmp 6f
4:      cmp $5, %ebx
        jne 5f
        bts $63, %rax                   # not executable
        jmp 6f
5:      and $~4, %rax                   # supervisor-only
6:      mov %rax, (%rdi)
        add $8, %rdi
        dec %ecx
        jnz 3b
        mov $40, %ebx                   # exits at a cold site before patched code runs again
7:      mov $UART_BASE + 7, %edi
        call uart_in
        dec %ebx
        jnz 7b
9:      pop %rbx
        ret
ENDF remap_implant

# uart_out(edi = port, esi = value)
FUNC uart_out
        mov %edi, %edx
        mov %esi, %eax
        out %al, %dx
        ret
ENDF uart_out

# uart_in(edi = port) -> eax = value
FUNC uart_in
        mov %edi, %edx
        xor %eax, %eax
        in %dx, %al
        ret
ENDF uart_in

# scribble_data(edi = seed): writes seed * 0x9e3779b9 + i * 0x01000193 to
# every dword of the implant's top SCRIBBLE_SIZE bytes (scribble=1 only).
FUNC scribble_data
        cmpl $1, cfg_scribble(%rip)
        jne 2f
        imul $0x9e3779b9, %edi, %eax
        mov $IMPLANT_END - SCRIBBLE_SIZE, %ecx
1:      mov %eax, (%rcx)
        add $0x01000193, %eax
        add $4, %ecx
        cmp $IMPLANT_END, %ecx
        jb 1b
2:      ret
ENDF scribble_data

# print_fields(rdi = fields: (label, digits) quads, rsi = dword values, edx = count):
# each label then its value in hex, then a newline.
FUNC print_fields
        push %rbx
        push %r12
        push %r13
        mov %rdi, %rbx
        mov %rsi, %r12
        mov %edx, %r13d
1:      mov (%rbx), %rdi
        call puts
        mov (%r12), %edi
        mov 8(%rbx), %esi
        call put_hex
        add $16, %rbx
        add $4, %r12
        dec %r13d
        jnz 1b
        mov $'\n', %edi
        call uart_putc
        pop %r13
        pop %r12
        pop %rbx
        ret
ENDF print_fields

# The DLAB excursion; prints what it read back.
FUNC dlab_phase
        mov $UART_BASE + 3, %edi        # LCR: DLAB | 8N1
        mov $0x83, %esi
        call uart_out
        mov $'D', %edi                  # through the hot path: DLL = 'D', then 'L'
        call uart_putc
        mov $'L', %edi
        call uart_putc
        mov $UART_BASE + 1, %edi        # DLM
        mov $0x5a, %esi
        call uart_out
        mov $UART_BASE, %edi
        call uart_in
        mov %eax, readback(%rip)        # DLL
        mov $UART_BASE + 1, %edi
        call uart_in
        mov %eax, readback + 4(%rip)    # DLM
        mov $UART_LSR, %edi
        call uart_in
        mov %eax, readback + 8(%rip)    # LSR
        mov $UART_BASE, %edi            # restore the divisor (9600 baud)
        mov $0x0c, %esi
        call uart_out
        mov $UART_BASE + 1, %edi
        xor %esi, %esi
        call uart_out
        mov $UART_BASE + 3, %edi        # DLAB off
        mov $0x03, %esi
        call uart_out
        lea dlab_fields(%rip), %rdi
        lea readback(%rip), %rsi
        mov $3, %edx
        jmp print_fields
ENDF dlab_phase

# The loopback excursion; prints what it read back.
FUNC loop_phase
        push %rbx
        push %r12
        mov $UART_BASE + 4, %edi        # MCR: LOOP | OUT2 | RTS | DTR
        mov $0x1b, %esi
        call uart_out
        mov $'A', %edi                  # through the hot path: into the receive FIFO
        call uart_putc
        mov $'B', %edi
        call uart_putc
        mov $'C', %edi
        call uart_putc
        mov $UART_LSR, %edi
        call uart_in
        mov %eax, readback(%rip)        # LSR with data ready
        xor %ebx, %ebx                  # the three received bytes
        mov $3, %r12d
1:      mov $UART_BASE, %edi
        call uart_in
        shl $8, %ebx
        or %eax, %ebx
        dec %r12d
        jnz 1b
        mov %ebx, readback + 4(%rip)
        mov $UART_LSR, %edi
        call uart_in
        mov %eax, readback + 8(%rip)    # LSR, FIFO empty
        mov $UART_BASE + 6, %edi
        call uart_in
        mov %eax, readback + 12(%rip)   # MSR (loopback: from MCR)
        mov $UART_BASE + 4, %edi        # loopback off
        mov $0x03, %esi
        call uart_out
        lea loop_fields(%rip), %rdi
        lea readback(%rip), %rsi
        mov $4, %edx
        pop %r12
        pop %rbx
        jmp print_fields
ENDF loop_phase

# CPL3.
FUNC user_main
        xor %r12d, %r12d                # round
1:      xor %ebx, %ebx                  # line
2:      lea str_line(%rip), %rdi
        call puts
        mov %r12d, %edi
        call put_dec
        mov $'.', %edi
        call uart_putc
        mov %ebx, %edi
        call put_dec
        lea str_text(%rip), %rdi
        call puts
        inc %ebx
        cmp cfg_lines(%rip), %ebx
        jb 2b
        lea 1(%r12), %edi
        call scribble_data
        call dlab_phase
        lea 0x100(%r12), %edi
        call scribble_data
        call loop_phase
        test %r12d, %r12d               # after the first round only
        jnz 3f
        mov cfg_scribble(%rip), %eax
        cmp $2, %eax                    # scribble=2: ud2 over the implant's code
        jne 4f
        mov $IMPLANT_BASE, %edi
        mov $0x0b0f0b0f, %eax           # ud2, ud2
        mov $SCRIBBLE_SIZE / 4, %ecx
        rep stosl
        jmp 3f
4:      cmp $3, %eax                    # scribble=3..6: the implant's mapping changes
        jb 3f
        cmp $7, %eax                    # (scribble=7: the tables split, nothing changed)
        jae 3f
        mov %eax, %edi
        call remap_implant
3:      inc %r12d
        cmp cfg_rounds(%rip), %r12d
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
OBJ key_rounds
        .asciz "rounds="
ENDO key_rounds
OBJ key_scribble
        .asciz "scribble="
ENDO key_scribble
OBJ str_line
        .asciz "line "
ENDO str_line
OBJ str_text
        .asciz ": the quick brown fox jumps over the lazy dog\n"
ENDO str_text
OBJ str_dlab
        .asciz "dlab: dll="
ENDO str_dlab
OBJ str_dlm
        .asciz " dlm="
ENDO str_dlm
OBJ str_lsr
        .asciz " lsr="
ENDO str_lsr
OBJ str_loop
        .asciz "loop: lsr="
ENDO str_loop
OBJ str_rx
        .asciz " rx="
ENDO str_rx
OBJ str_msr
        .asciz " msr="
ENDO str_msr
OBJ dlab_fields
        .quad str_dlab, 2, str_dlm, 2, str_lsr, 2
ENDO dlab_fields
OBJ loop_fields
        .quad str_loop, 2, str_rx, 6, str_lsr, 2, str_msr, 2
ENDO loop_fields
OBJ str_done
        .asciz "done\n"
ENDO str_done

        .bss
        .balign 4
OBJ cfg_lines
        .skip 4
ENDO cfg_lines
OBJ cfg_rounds
        .skip 4
ENDO cfg_rounds
OBJ cfg_scribble
        .skip 4
ENDO cfg_scribble
OBJ readback
        .skip 16
ENDO readback

        .balign 4096
OBJ pv_pt
        .skip 4096
ENDO pv_pt
OBJ implant_copy
        .skip SCRIBBLE_SIZE
ENDO implant_copy

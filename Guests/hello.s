# hello - the bundled demo guest: prints a greeting on the UART and exits
# through the debug-exit port with the value of exit=N (default 0).

        .include "macros.inc"
        .include "boot.inc"
        .include "console.inc"
        .include "cmdline.inc"

        .text
FUNC kmain
        call uart_init
        lea msg_hello(%rip), %rdi
        call puts
        lea key_exit(%rip), %rdi
        xor %esi, %esi
        call cmdline_num
        ret                             # eax = exit status
ENDF kmain

        .section .rodata, "a", @progbits
OBJ msg_hello
        .asciz "Hello from the VMMKit hello guest!\n"
ENDO msg_hello
OBJ key_exit
        .asciz "exit="
ENDO key_exit

# stack-chk.s - __stack_chk_fail for the C guests built with -fstack-protector
# (a distribution's default): exit through the debug-exit port with status
# 0x7e (a status no guest uses), then spin.
        .text
        .globl __stack_chk_fail
        .type __stack_chk_fail, @function
__stack_chk_fail:
        endbr64
        mov $0x7e, %al
        out %al, $0xf4
1:      pause
        jmp 1b
        .size __stack_chk_fail, . - __stack_chk_fail

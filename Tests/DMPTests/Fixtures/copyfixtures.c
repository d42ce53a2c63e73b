/* Functions DMP's function copy is tested on (Tests/DMPTests/CopyFixtures.swift is
 * generated from this file by generate.sh): gcc -O2, no hand shaping, except the
 * top-level asm functions, which hold what gcc does not emit (loop, jrcxz, a
 * jcc rel8 near its limit) and the refusals. */

static inline void outb(unsigned short port, unsigned char v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline unsigned char inb(unsigned short port) { unsigned char v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* A hot out inside a loop (the UART pattern). */
void uart_puts(const char *s) {
    while (*s) {
        while (!(inb(0x3fd) & 0x20)) {}
        outb(0x3f8, (unsigned char)*s++);
    }
}

/* A loop with a backward branch. */
int sum_loop(const int *a, int n) {
    int s = 0;
    for (int i = 0; i < n; i++) s += a[i] * 3 + (a[i] >> 2);
    return s;
}

/* A switch compiled to a jump table (an indirect jump). */
__attribute__((noinline, noipa)) int helper(int x) { return x * 7 + 1; }

int classify(int x, int y) {
    switch (x) {
    case 0: return y + 11;
    case 1: return y * 22;
    case 2: return helper(y) + 3;
    case 3: return y - 47;
    case 4: return y ^ 59;
    case 5: return y << 4;
    case 6: return helper(y + 71);
    case 7: return y / 3;
    default: return -1;
    }
}

/* Direct calls. */
__attribute__((noipa)) int calls(int x) { return helper(x) + helper(x + 1) * 2; }

/* A tail call (jmp rel32 to another function). */
int tail(int x) { return helper(x + 3); }

/* RIP-relative data (with -fpie) or absolute addresses (without). */
int counter;
int table[16] = {1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597};
int rip_data(int i) { counter++; return table[i & 15] + counter; }

/* An unlikely path gcc moves into rip_cold.cold. */
__attribute__((noreturn, cold, noinline)) void fail(int code) { for (;;) outb(0xf4, (unsigned char)code); }
int checked(int x) {
    if (__builtin_expect(x < 0, 0)) fail(x);
    return x * x + 1;
}

/* Calls from the other functions' bodies, for the call-site scanner. */
__attribute__((noipa)) int two_calls(int x) { return calls(x) + calls(x ^ 5) + classify(x & 7, x); }

/* A 2-byte hot instruction (out 0x80, al) in a loop: the dead-padding entry. */
void post_delay(int n) {
    for (int i = 0; i < n; i++) outb(0x80, (unsigned char)i);
}

/* A caller of uart_puts (a tail call, for the call-site entry). */
void greet(void) { uart_puts("hi\n"); }

/* A hot loop in a function that never returns, with a call (5 bytes) in the loop: the redirect entry. */
__attribute__((noreturn)) void run_forever(int i) {
    for (;;) outb(0x3f8, (unsigned char)helper(i++));
}

/* What gcc does not emit, in asm. */
__asm__(
    ".intel_syntax noprefix\n"
    /* ecx = edi; eax = edi * esi with loop (and jrcxz for edi = 0) */
    ".globl count_loop\n.type count_loop,@function\n"
    "count_loop:\n"
    "  mov ecx, edi\n  xor eax, eax\n  jrcxz 2f\n"
    "1: add eax, esi\n  loop 1b\n"
    "2: ret\n"
    ".size count_loop, .-count_loop\n"
    /* je over ~120 bytes of short branches: relaxed, the je's span passes 127 */
    ".globl near_limit\n.type near_limit,@function\n"
    "near_limit:\n"
    "  xor eax, eax\n  test edi, edi\n  je 9f\n"
    "  .irp n, 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n"
    "  cmp esi, \\n\n  jl 8f\n  add eax, \\n\n"
    "  .endr\n"
    "8: add eax, edi\n"
    "9: ret\n"
    ".size near_limit, .-near_limit\n"
    ".att_syntax prefix\n");

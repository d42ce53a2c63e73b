/* c-manyloops-cpl3 - a UART writer with a runtime of its own (nothing of c/
 * but the boot path of c/start.s) that spells the line-status poll out in
 * every output function: putch, puts_, putnum (twice: padding and digits),
 * puthex, putpad and newline each hold their own `while (!(inb(LSR) & THRE))`
 * loop and THR write, puthex and newline add a port-0x80 delay after the
 * write. Committed built at -O0 (c-manyloops-cpl3-O0): inb and outb stay out
 * of line, every port through the stack, and the one `out dx, al` of outb
 * writes both the THR (36 bytes a line) and port 0x80 (9 a line).
 * Runs at CPL3.
 * Command line: iters=N (default 400) warmup=W (default N/10).
 * RESULT checksum: FNV-1a 32 over the bytes of the N lines.
 * Exit status: 0. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* ---- the freestanding runtime gcc may call into, the protocol ports ---- */

typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);

__attribute__((used)) void *memset(void *dst, int c, size_t n)
{ unsigned char *d = dst; while (n--) *d++ = (unsigned char)c; return dst; }
__attribute__((used)) void *memcpy(void *dst, const void *src, size_t n)
{ unsigned char *d = dst; const unsigned char *s = src; while (n--) *d++ = *s++; return dst; }
__attribute__((used)) void *memmove(void *dst, const void *src, size_t n)
{ unsigned char *d = dst; const unsigned char *s = src;
  if (d < s) while (n--) *d++ = *s++; else while (n--) d[n] = s[n]; return dst; }
__attribute__((used)) int memcmp(const void *a, const void *b, size_t n)
{ const unsigned char *x = a, *y = b; for (; n; n--, x++, y++) if (*x != *y) return *x - *y; return 0; }

static inline u64 rt_tsc(void)
{ u32 lo, hi; __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }

static inline void rt_marker(u32 v)
{ __asm__ __volatile__("outl %0, %w1" : : "a"(v), "Nd"((u16)0x700)); }

__attribute__((noreturn)) static void rt_halt(int status)
{
	__asm__ __volatile__("outb %b0, $0xf4" : : "a"((u8)status));
	for (;;) __asm__ __volatile__("pause");
}

static unsigned long rt_arg(const char *cmdline, const char *key, unsigned long def)
{
	const char *p = cmdline;
	while (p && *p) {
		const char *k = key, *q = p; unsigned long v = 0; int digits = 0;
		while (*k && *q == *k) { k++; q++; }
		if (!*k && *q == '=' && (p == cmdline || p[-1] == ' ')) {
			for (q++; *q >= '0' && *q <= '9'; q++, digits++) v = v * 10 + (unsigned long)(*q - '0');
			return digits ? v : def;
		}
		p++;
	}
	return def;
}

static inline u32 rt_fnv(u32 h, u8 c) { return (h ^ c) * 0x01000193u; }

int main(const char *cmdline);
__attribute__((noreturn)) void c_start(const char *cmdline);
void c_start(const char *cmdline) { rt_halt(main(cmdline)); }

#define RT_ITERS(cmdline, def, iters, warmup) do { \
	iters = rt_arg(cmdline, "iters", def); if (iters < 1) iters = 1; \
	warmup = rt_arg(cmdline, "warmup", iters / 10); if (warmup > iters - 1) warmup = iters - 1; } while (0)

#define COM1 0x3f8
#define LSR (COM1 + 5)
#define THRE 0x20

static inline u8 inb(u16 port) { u8 v; __asm__ __volatile__("inb %w1, %b0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outb(u8 v, u16 port) { __asm__ __volatile__("outb %b0, %w1" : : "a"(v), "Nd"(port)); }

static u32 hash = 0x811c9dc5u;
static unsigned long sent;
static int counting = 1;	/* hash and sent cover the workload's bytes only */

static inline void count(u8 c)
{
	if (counting) {
		hash = rt_fnv(hash, c);
		sent++;
	}
}

static void putch(char c)
{
	while (!(inb(LSR) & THRE))
		;
	outb((u8)c, COM1);
	count((u8)c);
}

static void puts_(const char *s)
{
	for (; *s; s++) {
		while ((inb(LSR) & THRE) == 0)
			__asm__ __volatile__("pause");
		outb((u8)*s, COM1);
		count((u8)*s);
	}
}

static void putnum(unsigned long v, int width)
{
	char tmp[24];
	int n = 0;

	do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
	for (; width > n; width--) {
		while (!(inb(LSR) & THRE))
			;
		outb(' ', COM1);
		count(' ');
	}
	while (n) {
		u8 lsr;
		do lsr = inb(LSR); while (!(lsr & THRE));
		outb((u8)tmp[--n], COM1);
		count((u8)tmp[n]);
	}
}

static void puthex(u32 v, int digits)
{
	for (int i = digits - 1; i >= 0; i--) {
		char c = "0123456789ABCDEF"[(v >> (i * 4)) & 15];
		for (;;) {
			if (inb(LSR) & THRE)
				break;
		}
		outb((u8)c, COM1);
		outb(0, 0x80);		/* ISA recovery delay */
		count((u8)c);
	}
}

static void putpad(char c, int n)
{
	while (n-- > 0) {
		while (!(inb(LSR) & THRE))
			;
		outb((u8)c, COM1);
		count((u8)c);
	}
}

static void newline(void)
{
	while (!(inb(LSR) & 0x20))
		;
	outb('\n', COM1);
	outb(0, 0x80);
	count('\n');
}

static const char *const tags[] = { "boot", "init", "probe", "attach", "ready", "sleep" };

int main(const char *cmdline)
{
	unsigned long iters, warmup, i;
	u64 t0 = 0, t1;
	u32 x = 7;

	RT_ITERS(cmdline, 400, iters, warmup);
	for (i = 0; i < iters; i++) {
		if (i == warmup) { rt_marker(1); t0 = rt_tsc(); }
		x ^= x << 13; x ^= x >> 17; x ^= x << 5;
		putch('[');
		putnum(i, 6);
		puts_("] ");
		puts_(tags[x % 6]);
		putpad('.', 8 - (int)(x % 6));
		puts_(" 0x");
		puthex(x, 8);
		putch(' ');
		putnum(x % 1000, 0);
		newline();
	}
	t1 = rt_tsc();
	rt_marker(2);
	counting = 0;
	u32 h = hash; unsigned long nsent = sent;
	puts_("RESULT workload=c-manyloops-cpl3 iters=");
	putnum(iters, 0);
	puts_(" cycles_per_iter=");
	putnum((t1 - t0) / (iters - warmup), 0);
	puts_(" sent=");
	putnum(nsent, 0);
	puts_(" checksum=0x");
	puthex(h, 8);
	newline();
	return 0;
}

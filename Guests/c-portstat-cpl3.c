/* c-portstat-cpl3 - c-portops-cpl3's Linux-style UART writer (a uart_port whose
 * serial_in/serial_out function pointers are chosen at run time and called
 * from three functions) with per-port access statistics in the accessors:
 * `if (p->trace) p->reads++;` before the access (trace=1 turns them on).
 * Committed built with -falign-functions=1 (c-portstat-cpl3-noalign), as a
 * size-tuned kernel might be: no padding between functions, so the tiny
 * accessors (a 4-byte first instruction, a branch over the counter landing
 * just before the port access, no 5-byte instruction) have no way into a
 * copy of their own and are served through their callers' promoted calls.
 * Runs at CPL3.
 * Command line: iters=N (default 400) warmup=W (default N/10) slow=0|1 trace=0|1.
 * RESULT checksum: FNV-1a 32 over the bytes of the N lines (CRLF endings).
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

struct uart_port {
	unsigned long iobase;
	unsigned char trace, reads, writes;	/* statistics, wrapping */
	int regshift;
	unsigned (*serial_in)(struct uart_port *, int);
	void (*serial_out)(struct uart_port *, int, int);
	unsigned long tx, timeouts;
	u32 hash;
	int counting;		/* tx and hash count the workload's bytes only */
};

static unsigned io_serial_in(struct uart_port *p, int off)
{
	u8 v;
	if (p->trace)
		p->reads++;
	__asm__ __volatile__("inb %w1, %b0" : "=a"(v) : "Nd"((u16)(p->iobase + (off << p->regshift))));
	return v;
}

static void io_serial_out(struct uart_port *p, int off, int value)
{
	if (p->trace)
		p->writes++;
	__asm__ __volatile__("outb %b0, %w1" : : "a"((u8)value), "Nd"((u16)(p->iobase + (off << p->regshift))));
}

static unsigned io_serial_in_p(struct uart_port *p, int off)
{
	u8 v;
	if (p->trace)
		p->reads++;
	__asm__ __volatile__("inb %w1, %b0" : "=a"(v) : "Nd"((u16)(p->iobase + off)));
	__asm__ __volatile__("outb %%al, $0x80" : : "a"(0));
	return v;
}

static void io_serial_out_p(struct uart_port *p, int off, int value)
{
	if (p->trace)
		p->writes++;
	__asm__ __volatile__("outb %b0, %w1" : : "a"((u8)value), "Nd"((u16)(p->iobase + off)));
	__asm__ __volatile__("outb %%al, $0x80" : : "a"(0));
}

#define UART_LSR 5
#define UART_TX 0
#define UART_LCR 3
#define LSR_THRE 0x20
#define LSR_TEMT 0x40

static struct uart_port port;

static void wait_for_xmitr(struct uart_port *up, unsigned bits)
{
	unsigned tmout = 10000;
	for (;;) {
		unsigned status = up->serial_in(up, UART_LSR);
		if ((status & bits) == bits)
			break;
		if (--tmout == 0) {
			up->timeouts++;
			break;
		}
	}
}

static void serial_putchar(struct uart_port *up, int ch)
{
	wait_for_xmitr(up, LSR_THRE);
	up->serial_out(up, UART_TX, ch);
	if (up->counting) {
		up->hash = rt_fnv(up->hash, (u8)ch);
		up->tx++;
	}
}

__attribute__((noinline)) static void serial_write(struct uart_port *up, const char *s, unsigned n)
{
	for (unsigned i = 0; i < n; i++) {
		if (s[i] == '\n')
			serial_putchar(up, '\r');
		serial_putchar(up, s[i]);
	}
}

__attribute__((noinline)) static void serial_puts_fast(struct uart_port *up, const char *s)
{
	while (*s) {
		while (!(up->serial_in(up, UART_LSR) & LSR_THRE))
			;
		up->serial_out(up, UART_TX, *s);
		if (up->counting) {
			up->hash = rt_fnv(up->hash, (u8)*s);
			up->tx++;
		}
		s++;
	}
}

__attribute__((noinline)) static void serial_putdec(struct uart_port *up, unsigned long v)
{
	char b[24];
	int n = 0;
	do { b[n++] = (char)('0' + v % 10); v /= 10; } while (v);
	while (n--) {
		unsigned lsr;
		do lsr = up->serial_in(up, UART_LSR); while (!(lsr & LSR_THRE));
		up->serial_out(up, UART_TX, b[n]);
		if (up->counting) {
			up->hash = rt_fnv(up->hash, (u8)b[n]);
			up->tx++;
		}
	}
}

static const char *const words[] = { "eth0", "sda", "nvme0n1", "tty1", "loop7", "md127" };

int main(const char *cmdline)
{
	unsigned long iters, warmup, i;
	u64 t0 = 0, t1;
	char line[64];

	RT_ITERS(cmdline, 400, iters, warmup);
	port.iobase = 0x3f8;
	if (rt_arg(cmdline, "slow", 0)) {
		port.serial_in = io_serial_in_p;
		port.serial_out = io_serial_out_p;
	} else {
		port.serial_in = io_serial_in;
		port.serial_out = io_serial_out;
	}
	port.hash = 0x811c9dc5u;
	port.trace = (unsigned char)rt_arg(cmdline, "trace", 0);
	port.counting = 1;
	port.serial_out(&port, UART_LCR, 3);
	for (i = 0; i < iters; i++) {
		unsigned n = 0;
		const char *w = words[i % 6];
		if (i == warmup) { rt_marker(1); t0 = rt_tsc(); }
		serial_puts_fast(&port, "dev ");
		while (*w) line[n++] = *w++;
		line[n++] = ':';
		line[n++] = ' ';
		for (unsigned k = 0; k < (i % 5) + 3; k++) line[n++] = (char)('a' + (i + k) % 26);
		serial_write(&port, line, n);
		serial_putdec(&port, i * 7919 % 100003);
		serial_write(&port, "\n", 1);
	}
	t1 = rt_tsc();
	rt_marker(2);
	port.counting = 0;
	port.trace = 0;	/* the statistics, too, cover the workload only */
	u32 h = port.hash; unsigned long tx = port.tx;
	serial_puts_fast(&port, "RESULT workload=c-portstat-cpl3 iters=");
	serial_putdec(&port, iters);
	serial_puts_fast(&port, " cycles_per_iter=");
	serial_putdec(&port, (t1 - t0) / (iters - warmup));
	serial_puts_fast(&port, " tx=");
	serial_putdec(&port, tx);
	serial_puts_fast(&port, " checksum=");
	serial_putdec(&port, h);
	serial_puts_fast(&port, " timeouts=");
	serial_putdec(&port, port.timeouts);
	serial_write(&port, "\n", 1);
	return 0;
}

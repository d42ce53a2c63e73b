/* c-consoleops-cpl3 - a console driver reached through an ops table (putc,
 * write, flush and ready function pointers, as a kernel's early console
 * might be) and a printf with va_list (%d %u %x %s %c, width, '-' and '0'
 * padding) whose every byte goes through c->ops->putc. uart_putc turns '\n'
 * into "\r\n" by calling itself (crlf=1, the default) and polls the line
 * status through c->ops->ready.
 * Committed built with -falign-functions=1 (c-consoleops-cpl3-noalign): no
 * padding between functions, so uart_putc (a 2-byte first instruction,
 * called only through the pointer and from itself) has one way into a copy
 * of its own, on the rarely taken '\n' path (the `mov esi, 0xd` before its
 * recursive call), and uart_ready (a 4-byte first instruction, no 5-byte
 * instruction) none at all.
 * Runs at CPL3.
 * Command line: iters=N (default 400) warmup=W (default N/10) crlf=0|1.
 * RESULT checksum: FNV-1a 32 over the bytes written through the console
 * before the RESULT line; bytes: their count.
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

/* ---- the console ---- */

static inline u8 inb(u16 port) { u8 v; __asm__ __volatile__("inb %w1, %b0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outb(u8 v, u16 port) { __asm__ __volatile__("outb %b0, %w1" : : "a"(v), "Nd"(port)); }

struct console;
struct console_ops {
	void (*putc)(struct console *, char);
	void (*write)(struct console *, const char *, size_t);
	void (*flush)(struct console *);
	int (*ready)(struct console *);
};
struct console {
	const struct console_ops *ops;
	u16 base;
	u32 hash;
	unsigned long bytes;
	int crlf;
};

static int uart_ready(struct console *c) { return inb(c->base + 5) & 0x20; }

static void uart_putc(struct console *c, char ch)
{
	if (ch == '\n' && c->crlf)
		uart_putc(c, '\r');
	while (!c->ops->ready(c))
		__asm__ __volatile__("pause");
	outb((u8)ch, c->base);
	c->hash = rt_fnv(c->hash, (u8)ch);
	c->bytes++;
}

static void uart_write(struct console *c, const char *s, size_t n)
{
	while (n--)
		c->ops->putc(c, *s++);
}

static void uart_flush(struct console *c)
{
	while (!(inb(c->base + 5) & 0x40))
		;
}

static const struct console_ops uart_ops = { uart_putc, uart_write, uart_flush, uart_ready };
static struct console con0;
static struct console *active;

static void put_field(struct console *c, const char *s, int len, int width, int left, char pad)
{
	if (!left)
		for (; width > len; width--)
			c->ops->putc(c, pad);
	c->ops->write(c, s, (size_t)len);
	if (left)
		for (; width > len; width--)
			c->ops->putc(c, ' ');
}

static int kvprintf(struct console *c, const char *fmt, va_list ap)
{
	int count = 0;
	char buf[24];

	for (; *fmt; fmt++) {
		int left = 0, width = 0, len = 0, neg = 0;
		char pad = ' ';
		unsigned long v;
		const char *s;

		if (*fmt != '%') {
			c->ops->putc(c, *fmt);
			count++;
			continue;
		}
		fmt++;
		if (*fmt == '-') { left = 1; fmt++; }
		if (*fmt == '0') { pad = '0'; fmt++; }
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		switch (*fmt) {
		case 'd': {
			int d = va_arg(ap, int);
			neg = d < 0;
			v = neg ? -(unsigned long)(long)d : (unsigned long)d;
			goto decimal;
		}
		case 'u':
			v = va_arg(ap, unsigned);
		decimal:
			do { buf[sizeof(buf) - 1 - len++] = (char)('0' + v % 10); v /= 10; } while (v);
			if (neg) buf[sizeof(buf) - 1 - len++] = '-';
			put_field(c, buf + sizeof(buf) - len, len, width, left, pad);
			count += len > width ? len : width;
			break;
		case 'x':
			v = va_arg(ap, unsigned);
			do { buf[sizeof(buf) - 1 - len++] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
			put_field(c, buf + sizeof(buf) - len, len, width, left, pad);
			count += len > width ? len : width;
			break;
		case 's':
			s = va_arg(ap, const char *);
			while (s[len]) len++;
			put_field(c, s, len, width, left, ' ');
			count += len > width ? len : width;
			break;
		case 'c':
			c->ops->putc(c, (char)va_arg(ap, int));
			count++;
			break;
		default:
			c->ops->putc(c, '%');
			count++;
			break;
		}
	}
	return count;
}

__attribute__((format(printf, 1, 2))) static int kprintf(const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = kvprintf(active, fmt, ap);
	va_end(ap);
	return n;
}

static const char *const names[] = { "rx", "tx", "irq", "dma", "timer", "watchdog", "pci" };

int main(const char *cmdline)
{
	unsigned long iters, warmup, i, bytes;
	u64 t0 = 0, t1;
	u32 sum = 0, h;

	RT_ITERS(cmdline, 400, iters, warmup);
	con0.ops = &uart_ops;
	con0.base = 0x3f8;
	con0.hash = 0x811c9dc5u;
	con0.crlf = (int)rt_arg(cmdline, "crlf", 1);
	active = &con0;
	for (i = 0; i < iters; i++) {
		if (i == warmup) { rt_marker(1); t0 = rt_tsc(); }
		sum = sum * 33 + (u32)i;
		kprintf("ev %5u %-8s v=%08x d=%d c=%c|%4s|\n", (unsigned)i, names[i % 7], sum, (int)(sum % 200) - 100,
			(char)('A' + i % 26), names[(i + 3) % 7] + (i & 1));
	}
	t1 = rt_tsc();
	rt_marker(2);
	active->ops->flush(active);
	h = con0.hash;
	bytes = con0.bytes;
	kprintf("RESULT workload=c-consoleops iters=%u warmup=%u cycles_per_iter=%u checksum=0x%08x bytes=%u\n",
		(unsigned)iters, (unsigned)warmup, (unsigned)((t1 - t0) / (iters - warmup)), h, (unsigned)bytes);
	/* The RESULT line's cycle count differs from run to run: the console's
	 * statistics end as they were before it (memory compares equal). */
	con0.hash = h;
	con0.bytes = bytes;
	return 0;
}

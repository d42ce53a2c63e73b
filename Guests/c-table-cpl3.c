/* c-table-cpl3 - a UART logger written the way a firmware developer would,
 * with a runtime of its own: nothing of c/ but the boot path of c/start.s
 * (which calls c_start at CPL3). Not written by the DMP developers' hand and
 * not shaped for DMP.
 *
 * - Port access: reads are `static inline` (inline asm, always the DX form),
 *   the byte write is an out-of-line `noinline` function that every register
 *   write reaches by a direct call or a tail call.
 * - The 8250 driver is table-driven: a register map (offset, access, DLAB
 *   bank) per logical register, reads and writes dispatched by a `switch` on
 *   the logical register (jump tables at -O2), an LCR shadow, a polled
 *   transmitter wait with a spin budget (timeouts counted, never fatal).
 * - A logger with a table of sinks (function pointers: the UART line buffer,
 *   an FNV-1a hash, a byte counter), fed one character at a time by a
 *   callback-driven formatter (`%[-0][width](l)(u|d|x|s|c|%)`).
 * Runs at CPL3.
 * Command line: iters=N (default 200) warmup=W (default N/10).
 * RESULT checksum: FNV-1a 32 over the bytes of the N log lines.
 * Exit status: 0; 4 if the transmitter wait ever ran out. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* ---- the freestanding runtime gcc may call into ---------------------- */

void *memset(void *dst, int c, size_t n)
{
	unsigned char *d = dst;

	while (n--)
		*d++ = (unsigned char)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	while (n--)
		*d++ = *s++;
	return dst;
}

/* ---- port I/O ---------------------------------------------------------- */

static inline uint8_t pio_read8(uint16_t port)
{
	uint8_t v;

	__asm__ __volatile__("inb %%dx, %%al" : "=a"(v) : "d"(port));
	return v;
}

static inline void pio_write32(uint16_t port, uint32_t v)
{
	__asm__ __volatile__("outl %%eax, %%dx" : : "a"(v), "d"(port));
}

__attribute__((noinline)) static void pio_write8(uint16_t port, uint8_t v)
{
	__asm__ __volatile__("outb %%al, %%dx" : : "a"(v), "d"(port));
}

static inline uint64_t read_tsc(void)
{
	uint32_t lo, hi;

	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

#define DEBUG_EXIT_PORT 0xf4
#define MARKER_PORT 0x700

__attribute__((noreturn)) static void halt(int status)
{
	pio_write8(DEBUG_EXIT_PORT, (uint8_t)status);
	for (;;)
		__asm__ __volatile__("pause");
}

/* ---- the table-driven 8250 --------------------------------------------- */

enum uart_reg {
	UREG_RBR, UREG_THR, UREG_DLL, UREG_DLM, UREG_IER, UREG_IIR, UREG_FCR,
	UREG_LCR, UREG_MCR, UREG_LSR, UREG_MSR, UREG_SCR, UREG_COUNT
};

enum { ACC_R = 1, ACC_W = 2, BANK_DLAB = 4, BANK_NORMAL = 8 };

struct uart_regdesc {
	const char *name;
	uint8_t offset;
	uint8_t flags;
};

static const struct uart_regdesc uart_map_8250[UREG_COUNT] = {
	[UREG_RBR] = { "rbr", 0, ACC_R | BANK_NORMAL },
	[UREG_THR] = { "thr", 0, ACC_W | BANK_NORMAL },
	[UREG_DLL] = { "dll", 0, ACC_R | ACC_W | BANK_DLAB },
	[UREG_DLM] = { "dlm", 1, ACC_R | ACC_W | BANK_DLAB },
	[UREG_IER] = { "ier", 1, ACC_R | ACC_W | BANK_NORMAL },
	[UREG_IIR] = { "iir", 2, ACC_R },
	[UREG_FCR] = { "fcr", 2, ACC_W },
	[UREG_LCR] = { "lcr", 3, ACC_R | ACC_W },
	[UREG_MCR] = { "mcr", 4, ACC_R | ACC_W },
	[UREG_LSR] = { "lsr", 5, ACC_R },
	[UREG_MSR] = { "msr", 6, ACC_R },
	[UREG_SCR] = { "scr", 7, ACC_R | ACC_W },
};

#define LCR_DLAB 0x80
#define LCR_8N1 0x03
#define LSR_THRE 0x20
#define LSR_TEMT 0x40

struct uart {
	uint16_t base;
	uint8_t lcr;		/* shadow of LCR */
	const struct uart_regdesc *map;
	unsigned long spin_budget;
	unsigned long timeouts;
	unsigned long tx;
	unsigned long errors;	/* accesses to a register not in the current bank */
};

static int uart_bank_ok(const struct uart *u, const struct uart_regdesc *d)
{
	if ((d->flags & BANK_DLAB) && !(u->lcr & LCR_DLAB))
		return 0;
	if ((d->flags & BANK_NORMAL) && (u->lcr & LCR_DLAB))
		return 0;
	return 1;
}

/* Returns the register's value, or -1 for a register that cannot be read now. */
__attribute__((noinline)) static int uart_read(struct uart *u, enum uart_reg r)
{
	const struct uart_regdesc *d = &u->map[r];

	switch (r) {
	case UREG_LCR:
		return u->lcr;
	case UREG_LSR:
		return pio_read8(u->base + d->offset);
	case UREG_RBR:
	case UREG_DLL:
	case UREG_DLM:
	case UREG_IER:
		if (!uart_bank_ok(u, d)) {
			u->errors++;
			return -1;
		}
		return pio_read8(u->base + d->offset);
	case UREG_IIR:
	case UREG_MSR:
	case UREG_MCR:
	case UREG_SCR:
		return pio_read8(u->base + d->offset);
	case UREG_THR:
	case UREG_FCR:
	default:
		u->errors++;
		return -1;
	}
}

__attribute__((noinline)) static void uart_write(struct uart *u, enum uart_reg r, uint8_t v)
{
	const struct uart_regdesc *d = &u->map[r];

	switch (r) {
	case UREG_LCR:
		u->lcr = v;
		pio_write8(u->base + d->offset, v);
		return;
	case UREG_THR:
		u->tx++;
		/* fall through */
	case UREG_DLL:
	case UREG_DLM:
	case UREG_IER:
		if (!uart_bank_ok(u, d)) {
			u->errors++;
			return;
		}
		pio_write8(u->base + d->offset, v);
		return;
	case UREG_FCR:
	case UREG_MCR:
	case UREG_SCR:
		pio_write8(u->base + d->offset, v);
		return;
	default:
		u->errors++;
		return;
	}
}

/* Poll LSR until any bit of `mask` is set; 0, or -1 once the budget is spent. */
static int uart_wait(struct uart *u, uint8_t mask)
{
	unsigned long spins = u->spin_budget;

	do {
		int lsr = uart_read(u, UREG_LSR);

		if (lsr >= 0 && (lsr & mask))
			return 0;
	} while (--spins);
	u->timeouts++;
	return -1;
}

static void uart_putc(struct uart *u, char c)
{
	uart_wait(u, LSR_THRE);
	uart_write(u, UREG_THR, (uint8_t)c);
}

static void uart_setup(struct uart *u, uint16_t base, unsigned baud)
{
	unsigned divisor = 115200 / baud;

	u->base = base;
	u->map = uart_map_8250;
	u->spin_budget = 100000;
	u->timeouts = u->tx = u->errors = 0;
	uart_write(u, UREG_LCR, LCR_8N1);
	uart_write(u, UREG_IER, 0);
	uart_write(u, UREG_FCR, 0);
	uart_write(u, UREG_MCR, 0x03);
	uart_write(u, UREG_LCR, LCR_8N1 | LCR_DLAB);
	uart_write(u, UREG_DLL, divisor & 0xff);
	uart_write(u, UREG_DLM, divisor >> 8);
	uart_write(u, UREG_LCR, LCR_8N1);
}

/* ---- the logger: a table of sinks fed by a callback formatter ---------- */

typedef void (*emit_fn)(void *ctx, char c);

struct sink {
	const char *name;
	emit_fn emit;
	void (*flush)(void *ctx);
	void *ctx;
	int enabled;
};

struct line_buffer {
	struct uart *uart;
	unsigned len;
	char buf[120];
};

static void line_flush(void *ctx)
{
	struct line_buffer *lb = ctx;
	unsigned i;

	for (i = 0; i < lb->len; i++)
		uart_putc(lb->uart, lb->buf[i]);
	lb->len = 0;
}

static void line_emit(void *ctx, char c)
{
	struct line_buffer *lb = ctx;

	lb->buf[lb->len++] = c;
	if (c == '\n' || lb->len == sizeof(lb->buf))
		line_flush(lb);
}

static void hash_emit(void *ctx, char c)
{
	uint32_t *h = ctx;

	*h = (*h ^ (uint8_t)c) * 0x01000193u;
}

static void count_emit(void *ctx, char c)
{
	(void)c;
	++*(unsigned long *)ctx;
}

static void no_flush(void *ctx)
{
	(void)ctx;
}

#define MAX_SINKS 4
static struct sink sinks[MAX_SINKS];
static unsigned nsinks;

static int add_sink(const char *name, emit_fn emit, void (*flush)(void *), void *ctx)
{
	if (nsinks == MAX_SINKS)
		return -1;
	sinks[nsinks] = (struct sink){ .name = name, .emit = emit, .flush = flush, .ctx = ctx, .enabled = 1 };
	return (int)nsinks++;
}

static void emit_all(void *ctx, char c)
{
	unsigned i;

	(void)ctx;
	for (i = 0; i < nsinks; i++)
		if (sinks[i].enabled)
			sinks[i].emit(sinks[i].ctx, c);
}

struct spec {
	int left;
	char pad;
	int width;
	int is_long;
};

static int emit_str(emit_fn emit, void *ctx, const char *s, const struct spec *sp)
{
	int len = 0, n = 0;

	while (s[len])
		len++;
	if (!sp->left)
		for (; n < sp->width - len; n++)
			emit(ctx, ' ');
	for (int i = 0; i < len; i++, n++)
		emit(ctx, s[i]);
	for (; n < sp->width; n++)
		emit(ctx, ' ');
	return n;
}

static int emit_num(emit_fn emit, void *ctx, unsigned long v, int neg, unsigned base, const struct spec *sp)
{
	static const char digits[] = "0123456789abcdef";
	char tmp[24];
	int len = 0, n = 0, width = sp->width;

	do {
		tmp[len++] = digits[v % base];
		v /= base;
	} while (v);
	if (neg) {
		if (sp->pad == '0') {
			emit(ctx, '-');
			n++;
			width--;
		} else {
			tmp[len++] = '-';
		}
	}
	if (!sp->left)
		for (; len < width; width--, n++)
			emit(ctx, sp->pad);
	while (len) {
		emit(ctx, tmp[--len]);
		n++;
		width--;
	}
	for (; width > 0; width--, n++)
		emit(ctx, ' ');
	return n;
}

static int vformat(emit_fn emit, void *ctx, const char *fmt, va_list ap)
{
	int n = 0;

	for (; *fmt; fmt++) {
		struct spec sp = { 0, ' ', 0, 0 };
		long sv;

		if (*fmt != '%') {
			emit(ctx, *fmt);
			n++;
			continue;
		}
		fmt++;
		for (;; fmt++) {
			if (*fmt == '-')
				sp.left = 1;
			else if (*fmt == '0')
				sp.pad = '0';
			else
				break;
		}
		while (*fmt >= '0' && *fmt <= '9')
			sp.width = sp.width * 10 + (*fmt++ - '0');
		if (*fmt == 'l') {
			sp.is_long = 1;
			fmt++;
		}
		switch (*fmt) {
		case 'u':
			n += emit_num(emit, ctx, sp.is_long ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 0, 10, &sp);
			break;
		case 'd':
			sv = sp.is_long ? va_arg(ap, long) : va_arg(ap, int);
			n += emit_num(emit, ctx, sv < 0 ? -(unsigned long)sv : (unsigned long)sv, sv < 0, 10, &sp);
			break;
		case 'x':
			n += emit_num(emit, ctx, sp.is_long ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 0, 16, &sp);
			break;
		case 's':
			n += emit_str(emit, ctx, va_arg(ap, const char *), &sp);
			break;
		case 'c':
			emit(ctx, (char)va_arg(ap, int));
			n++;
			break;
		case '%':
			emit(ctx, '%');
			n++;
			break;
		case '\0':
			return n;
		default:
			emit(ctx, '%');
			emit(ctx, *fmt);
			n += 2;
			break;
		}
	}
	return n;
}

__attribute__((format(printf, 1, 2))) static int log_printf(const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vformat(emit_all, NULL, fmt, ap);
	va_end(ap);
	return n;
}

/* ---- the command line -------------------------------------------------- */

static unsigned long arg_ulong(const char *cmdline, const char *key, unsigned long def)
{
	const char *p = cmdline;

	while (p && *p) {
		const char *k = key, *q = p;
		unsigned long v = 0, base = 10;
		int digits = 0;

		while (*k && *q == *k) {
			k++;
			q++;
		}
		if (!*k && *q == '=' && (p == cmdline || p[-1] == ' ')) {
			q++;
			if (q[0] == '0' && (q[1] == 'x' || q[1] == 'X')) {
				base = 16;
				q += 2;
			}
			for (;; q++, digits++) {
				unsigned d;

				if (*q >= '0' && *q <= '9')
					d = *q - '0';
				else if (base == 16 && *q >= 'a' && *q <= 'f')
					d = *q - 'a' + 10;
				else if (base == 16 && *q >= 'A' && *q <= 'F')
					d = *q - 'A' + 10;
				else
					break;
				v = v * base + d;
			}
			return digits ? v : def;
		}
		p++;
	}
	return def;
}

/* ---- the workload ------------------------------------------------------ */

static const char *const subsystems[] = { "net", "blk", "irq", "timer", "sched", "mm", "fs" };
static const char levels[] = { 'I', 'W', 'D', 'E' };

static struct uart com1;
static struct line_buffer com1_lines = { .uart = &com1 };
static uint32_t line_hash;
static unsigned long bytes_logged;

static void dump_registers(struct uart *u)
{
	static const enum uart_reg shown[] = { UREG_IER, UREG_IIR, UREG_LCR, UREG_MCR, UREG_LSR, UREG_SCR };

	log_printf("uart at 0x%x:", u->base);
	for (unsigned i = 0; i < sizeof(shown) / sizeof(shown[0]); i++)
		log_printf(" %s=%02x", u->map[shown[i]].name, uart_read(u, shown[i]) & 0xff);
	log_printf("\n");
}

int main(const char *cmdline);

int main(const char *cmdline)
{
	unsigned long iters = arg_ulong(cmdline, "iters", 200), warmup, i;
	uint64_t t0 = 0, t1 = 0;
	int hash_sink;
	uint32_t state = 12345;

	if (iters < 1)
		iters = 1;
	warmup = arg_ulong(cmdline, "warmup", iters / 10);
	if (warmup > iters - 1)
		warmup = iters - 1;

	uart_setup(&com1, 0x3f8, 115200);
	add_sink("ttyS0", line_emit, line_flush, &com1_lines);
	add_sink("count", count_emit, no_flush, &bytes_logged);
	dump_registers(&com1);
	line_hash = 0x811c9dc5u;
	hash_sink = add_sink("fnv", hash_emit, no_flush, &line_hash);

	for (i = 0; i < iters; i++) {
		if (i == warmup) {
			pio_write32(MARKER_PORT, 1);
			t0 = read_tsc();
		}
		state = state * 1103515245u + 12345u;
		log_printf("[%c] %-5s #%04lu v=%08x d=%d\n", levels[(state >> 16) & 3],
			   subsystems[i % (sizeof(subsystems) / sizeof(subsystems[0]))], i,
			   state, (int)(state >> 20) % 1000 - 500);
	}
	t1 = read_tsc();
	pio_write32(MARKER_PORT, 2);
	sinks[hash_sink].enabled = 0;

	for (unsigned s = 0; s < nsinks; s++)
		sinks[s].flush(sinks[s].ctx);
	log_printf("logged %lu bytes, %lu sent, %lu timeouts, %lu bad accesses\n", bytes_logged, com1.tx,
		   com1.timeouts, com1.errors);
	log_printf("RESULT workload=c-table-cpl3 iters=%lu warmup=%lu cycles_per_iter=%lu checksum=0x%08x\n",
		   iters, warmup, (unsigned long)((t1 - t0) / (iters - warmup)), line_hash);
	return com1.timeouts ? 4 : 0;
}

__attribute__((noreturn)) void c_start(const char *cmdline);

void c_start(const char *cmdline)
{
	halt(main(cmdline));
}

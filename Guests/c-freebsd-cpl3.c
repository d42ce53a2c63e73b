/* c-freebsd-cpl3 - FreeBSD's uart(4) console path, written from memory by
 * someone who did not write DMP and not shaped for it, with a runtime of its
 * own (only c/start.s's boot path, which calls c_start at CPL3); built with
 * gcc -O2 -falign-functions=1 (image c-freebsd-cpl3-noalign): a struct
 * uart_bas with a bus_space tag and handle (x86 bus_space_read_1/write_1 test
 * the tag: I/O space is inb/outb of handle + offset, memory space a volatile
 * load/store), uart_getreg/uart_setreg shifting the register by regshft,
 * ns8250_putc waiting for THRE with a 250000 limit and DELAY(4) (a TSC spin
 * with pause), writing DATA, uart_barrier (bus_space_barrier: a locked add on
 * the stack), then waiting for TEMT the same way; the console through
 * struct consdev's cn_ops->cn_putc, uart_cnputc taking a spin mutex and calling
 * the class's ops->putc through a pointer; printf through kvprintf with a
 * putchar callback (func(c, arg)) and ksprintn filling a buffer backwards.
 * Command line: iters=N (300) warmup=W (N/10) tscfreq=HZ (2000000000, DELAY's).
 * RESULT checksum: FNV-1a 32 over every byte printed before it. */
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;
typedef unsigned int u_int; typedef unsigned long u_long; typedef unsigned char u_char;

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);

void *memset(void *dst, int c, size_t n)
{ unsigned char *d = dst; while (n--) *d++ = (unsigned char)c; return dst; }
void *memcpy(void *dst, const void *src, size_t n)
{ unsigned char *d = dst; const unsigned char *s = src; while (n--) *d++ = *s++; return dst; }

static inline u64 rt_tsc(void)
{ u32 lo, hi; __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }

static inline void rt_marker(u32 v)
{ __asm__ __volatile__("outl %0, %w1" : : "a"(v), "Nd"((u16)0x700)); }

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

#define X86_BUS_SPACE_IO 0
#define X86_BUS_SPACE_MEM 1
#define REG_DATA 0
#define REG_IER 1
#define REG_FCR 2
#define REG_LCR 3
#define REG_MCR 4
#define REG_LSR 5
#define LSR_THRE 0x20
#define LSR_TEMT 0x40
#define LCR_8BITS 0x03
#define LCR_DLAB 0x80
#define MCR_DTR 0x01
#define MCR_RTS 0x02
#define FCR_ENABLE 0x01

typedef u64 bus_space_tag_t;
typedef u64 bus_space_handle_t;
typedef u64 bus_size_t;

static inline u8 inb(u16 port) { u8 d; __asm__ __volatile__("inb %w1, %0" : "=a"(d) : "Nd"(port)); return d; }
static inline void outb(u16 port, u8 d) { __asm__ __volatile__("outb %0, %w1" : : "a"(d), "Nd"(port)); }
static inline void ia32_pause(void) { __asm__ __volatile__("pause"); }

static inline u8 bus_space_read_1(bus_space_tag_t tag, bus_space_handle_t bsh, bus_size_t offset)
{
	if (tag == X86_BUS_SPACE_IO)
		return inb(bsh + offset);
	return *(volatile u8 *)(bsh + offset);
}

static inline void bus_space_write_1(bus_space_tag_t tag, bus_space_handle_t bsh, bus_size_t offset, u8 value)
{
	if (tag == X86_BUS_SPACE_IO)
		outb(bsh + offset, value);
	else
		*(volatile u8 *)(bsh + offset) = value;
}

static inline void bus_space_barrier(bus_space_tag_t tag, bus_space_handle_t bsh, bus_size_t offset, bus_size_t len, int flags)
{
	(void)tag; (void)bsh; (void)offset; (void)len;
	if (flags & 1)
		__asm__ __volatile__("lock; addl $0,0(%%rsp)" : : : "memory", "cc");
	else
		__asm__ __volatile__("" : : : "memory");
}

struct uart_bas {
	bus_space_tag_t bst;
	bus_space_handle_t bsh;
	u_int chan;
	u_int rclk;
	u_int regshft;
	u_int regiowidth;
	u_int busy_detect;
};

#define uart_regofs(bas, reg) ((reg) << (bas)->regshft)
#define uart_getreg(bas, reg) bus_space_read_1((bas)->bst, (bas)->bsh, uart_regofs(bas, reg))
#define uart_setreg(bas, reg, value) bus_space_write_1((bas)->bst, (bas)->bsh, uart_regofs(bas, reg), value)
#define uart_barrier(bas) bus_space_barrier((bas)->bst, (bas)->bsh, 0, 0, 1 | 2)

static u64 tsc_freq = 2000000000;

static void DELAY(int n)
{
	u64 end, now;

	now = rt_tsc();
	end = now + tsc_freq * n / 1000000;
	do {
		ia32_pause();
		now = rt_tsc();
	} while (now < end);
}

static void ns8250_putc(struct uart_bas *bas, int c)
{
	int limit;

	limit = 250000;
	while ((uart_getreg(bas, REG_LSR) & LSR_THRE) == 0 && --limit)
		DELAY(4);
	uart_setreg(bas, REG_DATA, c);
	uart_barrier(bas);
	limit = 250000;
	while ((uart_getreg(bas, REG_LSR) & LSR_TEMT) == 0 && --limit)
		DELAY(4);
}

static int ns8250_rxready(struct uart_bas *bas) { return (uart_getreg(bas, REG_LSR) & 1) != 0; }

static void ns8250_init(struct uart_bas *bas, int baudrate, int databits, int stopbits, int parity)
{
	int divisor = bas->rclk / (baudrate << 4);
	u8 lcr;

	(void)stopbits; (void)parity;
	lcr = databits == 8 ? LCR_8BITS : 0;
	uart_setreg(bas, REG_LCR, lcr | LCR_DLAB);
	uart_barrier(bas);
	uart_setreg(bas, REG_DATA, divisor & 0xff);
	uart_setreg(bas, REG_IER, (divisor >> 8) & 0xff);
	uart_barrier(bas);
	uart_setreg(bas, REG_LCR, lcr);
	uart_barrier(bas);
	uart_setreg(bas, REG_IER, 0);
	uart_setreg(bas, REG_FCR, FCR_ENABLE);
	uart_setreg(bas, REG_MCR, MCR_DTR | MCR_RTS);
	uart_barrier(bas);
}

struct uart_ops {
	int (*probe)(struct uart_bas *);
	void (*init)(struct uart_bas *, int, int, int, int);
	void (*term)(struct uart_bas *);
	void (*putc)(struct uart_bas *, int);
	int (*rxready)(struct uart_bas *);
	int (*getc)(struct uart_bas *, void *);
};

static const struct uart_ops uart_ns8250_ops = {
	.init = ns8250_init,
	.putc = ns8250_putc,
	.rxready = ns8250_rxready,
};

struct mtx { volatile u_long mtx_lock; const char *name; u_int spin_count; };

static void mtx_lock_spin(struct mtx *m)
{
	while (!__sync_bool_compare_and_swap(&m->mtx_lock, 0, 1)) {
		m->spin_count++;
		ia32_pause();
	}
}

static void mtx_unlock_spin(struct mtx *m) { __atomic_store_n(&m->mtx_lock, 0, __ATOMIC_RELEASE); }

struct uart_devinfo {
	struct uart_bas bas;
	const struct uart_ops *ops;
	int baudrate, databits, stopbits, parity;
	struct mtx *hwmtx;
	void *cookie;
};

struct consdev;
struct consdev_ops {
	void (*cn_probe)(struct consdev *);
	void (*cn_init)(struct consdev *);
	void (*cn_term)(struct consdev *);
	int (*cn_getc)(struct consdev *);
	void (*cn_putc)(struct consdev *, int);
	void (*cn_grab)(struct consdev *);
	void (*cn_ungrab)(struct consdev *);
};

struct consdev {
	const struct consdev_ops *cn_ops;
	short cn_pri;
	void *cn_arg;
	int cn_flags;
	char cn_name[16];
};

static void uart_cnputc(struct consdev *cp, int c)
{
	struct uart_devinfo *di = cp->cn_arg;

	mtx_lock_spin(di->hwmtx);
	di->ops->putc(&di->bas, c);
	mtx_unlock_spin(di->hwmtx);
}

static void uart_cninit(struct consdev *cp)
{
	struct uart_devinfo *di = cp->cn_arg;
	di->ops->init(&di->bas, di->baudrate, di->databits, di->stopbits, di->parity);
}

static const struct consdev_ops uart_cnops = { .cn_init = uart_cninit, .cn_putc = uart_cnputc };

static struct mtx uart_hwmtx = { 0, "uart_hwmtx", 0 };
static struct uart_devinfo uart_console = {
	.bas = { .bst = X86_BUS_SPACE_IO, .bsh = 0x3f8, .rclk = 1843200, .regshft = 0, .regiowidth = 1 },
	.ops = &uart_ns8250_ops, .baudrate = 115200, .databits = 8, .stopbits = 1, .parity = 0, .hwmtx = &uart_hwmtx,
};
static struct consdev uart_consdev = { .cn_ops = &uart_cnops, .cn_pri = 3, .cn_arg = &uart_console, .cn_name = "uart" };
static struct consdev *cn_tab[2] = { &uart_consdev, 0 };
static u32 cn_hash = 0x811c9dc5u;

static void cnputc(int c)
{
	struct consdev *cn;
	int i;

	for (i = 0; (cn = cn_tab[i]) != 0; i++) {
		if (c == '\n')
			cn->cn_ops->cn_putc(cn, '\r');
		cn->cn_ops->cn_putc(cn, c);
	}
	cn_hash = rt_fnv(cn_hash, (u8)c);
}

struct putchar_arg { int flags; int pri; void *tty; char *p_bufr; size_t n_bufr; char *p_next; size_t remain; };

static void putchar_(int c, void *arg)
{
	struct putchar_arg *ap = arg;
	(void)ap;
	cnputc(c);
}

static char const hex2ascii_data[] = "0123456789abcdefghijklmnopqrstuvwxyz";
#define hex2ascii(hex) (hex2ascii_data[hex])
#define MAXNBUF 65

static char *ksprintn(char *nbuf, unsigned long num, int base, int *lenp, int upper)
{
	char *p, c;

	p = nbuf;
	*p = '\0';
	do {
		c = hex2ascii(num % base);
		*++p = upper ? (c >= 'a' ? c - 32 : c) : c;
	} while (num /= base);
	if (lenp)
		*lenp = p - nbuf;
	return p;
}

static int kvprintf(char const *fmt, void (*func)(int, void *), void *arg, int radix, va_list ap)
{
#define PCHAR(c) { int cc = (c); if (func) (*func)(cc, arg); retval++; }
	char nbuf[MAXNBUF];
	const char *p;
	int ch, n, base, lflag, width, ladjust, sharpflag, neg, retval = 0, upper;
	unsigned long num;
	char padc;

	for (;;) {
		padc = ' ';
		width = 0;
		while ((ch = (u_char)*fmt++) != '%') {
			if (ch == '\0')
				return retval;
			PCHAR(ch);
		}
		lflag = 0; ladjust = 0; sharpflag = 0; neg = 0; upper = 0; base = radix;
reswitch:
		switch (ch = (u_char)*fmt++) {
		case '-': ladjust = 1; goto reswitch;
		case '#': sharpflag = 1; goto reswitch;
		case '0': padc = '0'; goto reswitch;
		case '1': case '2': case '3': case '4': case '5': case '6': case '7': case '8': case '9':
			for (n = 0;; ++fmt) {
				n = n * 10 + ch - '0';
				ch = *fmt;
				if (ch < '0' || ch > '9')
					break;
			}
			width = n;
			goto reswitch;
		case 'l': lflag = 1; goto reswitch;
		case 'c': PCHAR(va_arg(ap, int)); break;
		case 's':
			p = va_arg(ap, char *);
			if (p == 0)
				p = "(null)";
			n = 0;
			while (p[n]) n++;
			width -= n;
			if (!ladjust && width > 0) while (width--) PCHAR(padc);
			while (n--) PCHAR(*p++);
			if (ladjust && width > 0) while (width--) PCHAR(padc);
			break;
		case 'd': case 'i':
			base = 10;
			num = lflag ? (unsigned long)va_arg(ap, long) : (unsigned long)(long)va_arg(ap, int);
			if ((long)num < 0) { neg = 1; num = -(long)num; }
			goto number;
		case 'u': base = 10; goto handle_nosign;
		case 'X': upper = 1; /* fall through */
		case 'x': base = 16; goto handle_nosign;
		case 'p': base = 16; sharpflag = 1; lflag = 1; goto handle_nosign;
handle_nosign:
			num = lflag ? va_arg(ap, unsigned long) : va_arg(ap, u_int);
number:
			p = ksprintn(nbuf, num, base, &n, upper);
			int tmp = 0;
			if (sharpflag && num != 0 && base == 16) tmp += 2;
			if (neg) tmp++;
			if (!ladjust && padc == ' ' && width - n - tmp > 0) { width -= n + tmp; while (width-- > 0) PCHAR(' '); }
			if (neg) PCHAR('-');
			if (sharpflag && num != 0 && base == 16) { PCHAR('0'); PCHAR('x'); }
			if (!ladjust && padc == '0' && width - n - tmp > 0) { width -= n + tmp; while (width-- > 0) PCHAR('0'); }
			while (*p) PCHAR(*p--);
			if (ladjust && width - n - tmp > 0) { width -= n + tmp; while (width-- > 0) PCHAR(' '); }
			break;
		default:
			PCHAR('%');
			PCHAR(ch);
			break;
		}
	}
#undef PCHAR
}

static int printf(const char *fmt, ...)
{
	va_list ap;
	struct putchar_arg pca = { 0 };
	int retval;

	va_start(ap, fmt);
	retval = kvprintf(fmt, putchar_, &pca, 10, ap);
	va_end(ap);
	return retval;
}

int main(const char *cmdline);

static const char *const devs[] = { "ada0", "da0", "nvd0", "vtbd0", "cd0", "em0", "re0" };

int main(const char *cmdline)
{
	unsigned long iters, warmup, i;
	u64 t0 = 0, t1;

	iters = rt_arg(cmdline, "iters", 300);
	if (iters < 1)
		iters = 1;
	warmup = rt_arg(cmdline, "warmup", iters / 10);
	if (warmup > iters - 1)
		warmup = iters - 1;
	tsc_freq = rt_arg(cmdline, "tscfreq", tsc_freq);
	uart_consdev.cn_ops->cn_init(&uart_consdev);
	printf("Copyright (c) 1992-2023 The FreeBSD Project.\nFreeBSD 14.0-RELEASE #%d\n", 0);
	for (i = 0; i < iters; i++) {
		if (i == warmup) {
			rt_marker(1);
			t0 = rt_tsc();
		}
		printf("%s: <%s> at scbus%d target %d lun %d, %lu MB (%u %d byte sectors) %#lx\n",
		       devs[i % 7], (i & 1) ? "QEMU HARDDISK 2.5+" : "VBOX CD-ROM 1.0", (int)(i % 4), (int)(i % 3), 0,
		       (unsigned long)(i * 977 % 100000), (unsigned)(i * 2654435761u), 512, i << 12);
	}
	t1 = rt_tsc();
	rt_marker(2);
	printf("mtx spins %u\n", uart_hwmtx.spin_count);
	printf("RESULT workload=c-freebsd-cpl3 iters=%lu warmup=%lu cycles_per_iter=%lu checksum=0x%08x\n", iters, warmup,
	       (unsigned long)((t1 - t0) / (iters - warmup)), cn_hash);
	return 0;
}

__attribute__((noreturn)) void c_start(const char *cmdline);

void c_start(const char *cmdline)
{
	__asm__ __volatile__("outb %b0, $0xf4" : : "a"((u8)main(cmdline)));
	for (;;)
		__asm__ __volatile__("pause");
}

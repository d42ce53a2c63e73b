/* c-openbsd-cpl3 - OpenBSD's com(4) console path, written from memory by
 * someone who did not write DMP and not shaped for it, with a runtime of its
 * own (only c/start.s's boot path, which calls c_start at CPL3). Built at
 * gcc -O2 (image c-openbsd-cpl3) and -O2 -falign-functions=1 (-noalign).
 * comcnputc is reached only through cn_tab->cn_putc; it starts with a
 * 1-byte push, waits for TXRDY in a loop whose only 5-byte instructions are
 * on the delay(1) path (never taken while TXRDY is set), and ends in gcc's
 * tail call `jmp splx` (no ret).
 * Command line: iters=N (300) warmup=W (N/10).
 * RESULT checksum: FNV-1a 32 over every byte logged before it. Exit 0. */
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- the freestanding runtime gcc may call into, the protocol ports ---- */

typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
size_t strlen(const char *s);

__attribute__((used)) void *memset(void *dst, int c, size_t n)
{ unsigned char *d = dst; while (n--) *d++ = (unsigned char)c; return dst; }
__attribute__((used)) void *memcpy(void *dst, const void *src, size_t n)
{ unsigned char *d = dst; const unsigned char *s = src; while (n--) *d++ = *s++; return dst; }
__attribute__((used)) size_t strlen(const char *s)
{ size_t n = 0; while (s[n]) n++; return n; }

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

/* ---- the driver, in its project's style ---- */
/* OpenBSD's com(4) console path (sys/dev/ic/com.c), from memory: comcnputc(dev,
 * c) raises the IPL (s = spltty()), waits for LSR_TXRDY with timo = 2000 and
 * delay(1) between reads, writes the data register, a bus_space barrier,
 * waits for LSR_TXRDY again the same way, then splx(s): splraise, splx and
 * delay live in another compilation unit (delay spins on the TSC); the
 * console registers through com_read_reg/com_write_reg of comconsiot and
 * comconsioh, shifted by the register shift (bus_space_read_1 tests the tag:
 * inb for I/O space, a volatile load for memory space); comcnputc reached
 * through cn_tab->cn_putc from cnputc, putchar via kprintf's putchar(c,
 * flags) with a ksprintn buffer filled backwards. */
typedef unsigned long bus_space_handle_t;
typedef int bus_space_tag_t;
typedef unsigned long bus_size_t;
typedef int dev_t;

static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %w1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %w1" : : "a"(v), "Nd"(port)); }

#define X86_BUS_SPACE_IO 0
static inline u8 bus_space_read_1(bus_space_tag_t t, bus_space_handle_t h, bus_size_t o)
{ if (t == X86_BUS_SPACE_IO) return inb(h + o); return *(volatile u8 *)(h + o); }
static inline void bus_space_write_1(bus_space_tag_t t, bus_space_handle_t h, bus_size_t o, u8 v)
{ if (t == X86_BUS_SPACE_IO) outb(h + o, v); else *(volatile u8 *)(h + o) = v; }
static inline void bus_space_barrier(bus_space_tag_t t, bus_space_handle_t h, bus_size_t o, bus_size_t l, int f)
{ (void)t; (void)h; (void)o; (void)l; (void)f; __asm__ volatile("" ::: "memory"); }

#define ISSET(t, f) ((t) & (f))
#define LSR_TXRDY 0x20
#define LSR_TSRE 0x40
#define LSR_RXRDY 0x01
#define LCR_DLAB 0x80
#define LCR_8BITS 0x03
#define MCR_DTR 0x01
#define MCR_RTS 0x02
#define BR 1
#define BW 2

/* sys/arch/x86/x86/spl.S: another compilation unit */
static volatile int cpl_level;
static unsigned long splx_calls;
__attribute__((noinline)) int splraise(int nlevel);
int splraise(int nlevel) { int o = cpl_level; if (nlevel > o) cpl_level = nlevel; return o; }
__attribute__((noinline)) void splx(int s);
void splx(int s) { cpl_level = s; splx_calls++; }
#define IPL_HIGH 8
#define splserial() splraise(IPL_HIGH)


static bus_space_tag_t comconsiot;
static bus_space_handle_t comconsioh;
static int comcons_reg_shift;

/* sys/arch/amd64: delay() through the TSC, another compilation unit */
static unsigned long delay_calls;
__attribute__((noinline)) void delay(int usecs);
void delay(int usecs)
{
	u64 end = rt_tsc() + (u64)usecs * 2000;
	delay_calls++;
	while (rt_tsc() < end)
		__asm__ volatile("pause");
}

static inline u8 com_read_reg_cons(bus_size_t reg)
{
	reg <<= comcons_reg_shift;
	return bus_space_read_1(comconsiot, comconsioh, reg);
}

static inline void com_write_reg_cons(bus_size_t reg, u8 value)
{
	reg <<= comcons_reg_shift;
	bus_space_write_1(comconsiot, comconsioh, reg, value);
}

#define IPL_TTY 9
#define spltty() splraise(IPL_TTY)
#define com_lsr 5
#define com_data 0

void comcnputc(dev_t dev, int c);
void comcnputc(dev_t dev, int c)
{
	int s = spltty();
	int timo;
	(void)dev;

	/* wait for any pending transmission to finish */
	timo = 2000;
	while (!ISSET(com_read_reg_cons(com_lsr), LSR_TXRDY) && --timo)
		delay(1);

	com_write_reg_cons(com_data, (u8)(c & 0xff));
	bus_space_barrier(comconsiot, comconsioh, 0, 8, (BR | BW));

	/* wait for this transmission to complete */
	timo = 2000;
	while (!ISSET(com_read_reg_cons(com_lsr), LSR_TXRDY) && --timo)
		delay(1);

	splx(s);
}

static void cominit_cons(int rate, int frequency)
{
	int divisor = frequency / (rate * 16);
	com_write_reg_cons(3, LCR_DLAB);
	com_write_reg_cons(0, divisor & 0xff);
	com_write_reg_cons(1, divisor >> 8);
	com_write_reg_cons(3, LCR_8BITS);
	com_write_reg_cons(4, MCR_DTR | MCR_RTS);
	com_write_reg_cons(2, 0);
	com_write_reg_cons(1, 0);
}

struct consdev {
	void (*cn_probe)(struct consdev *);
	void (*cn_init)(struct consdev *);
	int (*cn_getc)(dev_t);
	void (*cn_putc)(dev_t, int);
	void (*cn_pollc)(dev_t, int);
	void (*cn_bell)(dev_t, unsigned, unsigned, unsigned);
	dev_t cn_dev;
	int cn_pri;
};
static struct consdev comcons = { .cn_putc = comcnputc, .cn_dev = 0, .cn_pri = 3 };
static struct consdev *cn_tab = &comcons;
/* sys/kern/tty.c / subr_prf.c */
static u32 msgbuf_hash = 0x811c9dc5u;
#define TOCONS 0x01
#define TOLOG 0x04

static void cnputc(int c)
{
	if (cn_tab == NULL)
		return;
	if (c) {
		(*cn_tab->cn_putc)(cn_tab->cn_dev, c);
		if (c == '\n')
			(*cn_tab->cn_putc)(cn_tab->cn_dev, '\r');
	}
}

static void putchar_(int c, int flags)
{
	if (flags & TOLOG)
		msgbuf_hash = rt_fnv(msgbuf_hash, (u8)c);
	if (flags & TOCONS)
		cnputc(c);
}

static char *ksprintn(char *nbuf, unsigned long ul, int base, int *lenp)
{
	char *p = nbuf;
	*p = 0;
	do { *++p = "0123456789abcdef"[ul % base]; } while (ul /= base);
	if (lenp) *lenp = p - nbuf;
	return p;
}

static void kprintf(const char *fmt, int oflags, va_list ap)
{
	char nbuf[72];
	int ch, width, n;
	char padc;
	unsigned long ul;
	const char *p;
	for (;;) {
		while ((ch = *(const unsigned char *)fmt++) != '%') {
			if (ch == 0) return;
			putchar_(ch, oflags);
		}
		padc = ' '; width = 0;
		int lflag = 0;
reswitch:
		switch (ch = *(const unsigned char *)fmt++) {
		case '0': padc = '0'; goto reswitch;
		case '1': case '2': case '3': case '4': case '5': case '6': case '7': case '8': case '9':
			for (width = 0;; ++fmt) { width = width * 10 + ch - '0'; ch = *fmt; if (ch < '0' || ch > '9') break; }
			goto reswitch;
		case 'l': lflag = 1; goto reswitch;
		case 's':
			p = va_arg(ap, const char *);
			while (*p) putchar_(*p++, oflags);
			break;
		case 'd': { long v = lflag ? va_arg(ap, long) : va_arg(ap, int);
			if (v < 0) { putchar_('-', oflags); v = -v; } ul = v; goto number10; }
		case 'u': ul = lflag ? va_arg(ap, unsigned long) : va_arg(ap, unsigned); goto number10;
		case 'x': ul = lflag ? va_arg(ap, unsigned long) : va_arg(ap, unsigned);
			p = ksprintn(nbuf, ul, 16, &n); goto out;
number10:
			p = ksprintn(nbuf, ul, 10, &n);
out:
			while (width-- > n) putchar_(padc, oflags);
			while (*p) putchar_(*p--, oflags);
			break;
		default: putchar_('%', oflags); putchar_(ch, oflags); break;
		}
	}
}

static void printf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	kprintf(fmt, TOCONS | TOLOG, ap);
	va_end(ap);
}

static const char *const drv[] = { "wd0", "sd0", "cd0", "wm0", "re0", "ld0" };

int main(const char *cmdline)
{
	unsigned long iters, warmup, i;
	u64 t0 = 0, t1;

	RT_ITERS(cmdline, 300, iters, warmup);
	comconsiot = X86_BUS_SPACE_IO;
	comconsioh = 0x3f8;
	cominit_cons(115200, 1843200);
	printf("OpenBSD 7.5 (GENERIC) #82: Wed Mar 20 15:48:40 MDT 2024\n");
	for (i = 0; i < iters; i++) {
		if (i == warmup) { rt_marker(1); t0 = rt_tsc(); }
		printf("%s at atabus%d drive %d: <QEMU HARDDISK> %lu MB, %u cyl, %d head, %d sec, 512 bytes/sect x %lu sectors\n",
		       drv[i % 6], (int)(i % 4), (int)(i % 2), (unsigned long)(i * 977), (unsigned)(i * 31 % 16383), 16, 63,
		       (unsigned long)(i * 2654435761u % 100000000));
	}
	t1 = rt_tsc();
	rt_marker(2);
	printf("RESULT workload=c-openbsd-cpl3 iters=%lu warmup=%lu cycles_per_iter=%lu splx=%lu delay=%lu checksum=0x%08x\n", iters, warmup,
	       (unsigned long)((t1 - t0) / (iters - warmup)), splx_calls, delay_calls, msgbuf_hash);
	return 0;
}

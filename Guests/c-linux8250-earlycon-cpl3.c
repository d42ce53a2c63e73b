/* c-linux8250-earlycon-cpl3 - c-linux8250-cpl3 (Linux's 8250 console path,
 * written from memory, not shaped for DMP, a runtime of its own) with the boot
 * console first: 8250_early.c's early_serial8250_write calls the same
 * uart_console_write(port, s, count, serial_putc) (serial_putc writes TX, then
 * polls LSR for both-empty through serial8250_early_in/out) until the real
 * console (univ8250_console_write -> serial8250_console_write ->
 * uart_console_write(port, s, count, serial8250_console_putchar)) takes over,
 * so uart_console_write gets two putchar functions and calls them through
 * its argument (`call r13`), as serial_core.c's exported function does.
 * Built at -O2 (image c-linux8250-earlycon-cpl3), -Os (-Os) and -O2
 * -falign-functions=1 (-noalign). At -Os and -noalign
 * serial8250_console_putchar ends in serial_port_out's sibling call (`jmp
 * rax` to io_serial_out), so the THR write's return address leads to the
 * indirect call of serial8250_console_putchar, not of io_serial_out.
 * The RESULT line is printed with printk.time off (no timestamp before it).
 * Command line: iters=N (300) warmup=W (N/10).
 * RESULT checksum: FNV-1a 32 over every record printed before it. Exit 0. */
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
/* Linux's 8250 console, from memory: printk formats into a record buffer and
 * console_unlock calls con->write (univ8250_console_write ->
 * serial8250_console_write), which saves IER, clears it, writes the text with
 * uart_console_write(port, s, count, serial8250_console_putchar) ('\n' ->
 * "\r\n"), waits for both-empty, and restores IER; the putchar waits for the
 * transmitter (wait_for_xmitr: the LSR read through serial_lsr_in with a
 * tmout of 10000 and udelay(1), a TSC spin) then serial_port_out(port,
 * UART_TX, ch) -> port->serial_out -> io_serial_out: outb(value,
 * p->iobase + (offset << p->regshift)). Accessors set at run time by
 * set_io_from_upio. */
typedef unsigned int uint;
typedef unsigned long ulong;
typedef unsigned char upf_t_byte;

static inline u8 inb(ulong port) { u8 v; __asm__ volatile("inb %w1, %0" : "=a"(v) : "Nd"((u16)port)); return v; }
static inline void outb(u8 value, ulong port) { __asm__ volatile("outb %0, %w1" : : "a"(value), "Nd"((u16)port)); }
static inline void cpu_relax(void) { __asm__ volatile("rep; nop" ::: "memory"); }
#define READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))

/* arch/x86/lib/delay.c: delay_tsc */
static unsigned long loops_per_jiffy = 4000000, tsc_khz = 2000000;
static void delay_tsc(u64 cycles)
{
	u64 bclock, now;
	bclock = rt_tsc();
	for (;;) {
		now = rt_tsc();
		if ((now - bclock) >= cycles)
			break;
		cpu_relax();
	}
}
__attribute__((noinline)) static void __const_udelay(unsigned long xloops)
{
	unsigned long lpj = loops_per_jiffy;
	(void)lpj;
	delay_tsc((xloops * tsc_khz) >> 32 ? (xloops * tsc_khz) >> 32 : 1);
}
#define udelay(n) __const_udelay((n) * 0x10c7ul)

static unsigned long watchdog_touch;
static inline void touch_nmi_watchdog(void) { watchdog_touch++; __asm__ volatile("" ::: "memory"); }

struct uart_port;
struct uart_port {
	unsigned long iobase;
	unsigned char *membase;
	unsigned int (*serial_in)(struct uart_port *, int);
	void (*serial_out)(struct uart_port *, int, int);
	unsigned int irq;
	unsigned char regshift;
	unsigned char iotype;
	unsigned int flags;
	unsigned int uartclk;
	int lock;
	unsigned long tx;
};

struct uart_8250_port {
	struct uart_port port;
	unsigned short capabilities;
	unsigned char ier;
	unsigned char lcr;
	unsigned char mcr;
	unsigned short lsr_saved_flags;
	unsigned char msr_saved_flags;
};

#define UART_TX 0
#define UART_IER 1
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_MSR 6
#define UART_LSR_THRE 0x20
#define UART_LSR_TEMT 0x40
#define UART_LSR_BOTH_EMPTY (UART_LSR_TEMT | UART_LSR_THRE)
#define LSR_SAVE_FLAGS 0x9e
#define UART_MSR_CTS 0x10
#define UPF_CONS_FLOW (1u << 23)
#define UPIO_PORT 0
#define UPIO_MEM 2

#define up_to_u8250p(p) ((struct uart_8250_port *)(p))

static unsigned int io_serial_in(struct uart_port *p, int offset)
{
	offset = offset << p->regshift;
	return inb(p->iobase + offset);
}

static void io_serial_out(struct uart_port *p, int offset, int value)
{
	offset = offset << p->regshift;
	outb(value, p->iobase + offset);
}

static unsigned int mem_serial_in(struct uart_port *p, int offset)
{
	offset = offset << p->regshift;
	return READ_ONCE(p->membase[offset]);
}

static void mem_serial_out(struct uart_port *p, int offset, int value)
{
	offset = offset << p->regshift;
	*(volatile unsigned char *)(p->membase + offset) = value;
}

static void set_io_from_upio(struct uart_port *p)
{
	switch (p->iotype) {
	case UPIO_MEM:
		p->serial_in = mem_serial_in;
		p->serial_out = mem_serial_out;
		break;
	default:
		p->serial_in = io_serial_in;
		p->serial_out = io_serial_out;
		break;
	}
}

static inline int serial_in(struct uart_8250_port *up, int offset) { return up->port.serial_in(&up->port, offset); }
static inline void serial_out(struct uart_8250_port *up, int offset, int value) { up->port.serial_out(&up->port, offset, value); }
static inline unsigned int serial_port_in(struct uart_port *up, int offset) { return up->serial_in(up, offset); }
static inline void serial_port_out(struct uart_port *up, int offset, int value) { up->serial_out(up, offset, value); }

static inline unsigned short serial_lsr_in(struct uart_8250_port *up)
{
	unsigned short lsr = up->lsr_saved_flags;
	lsr |= serial_in(up, UART_LSR);
	up->lsr_saved_flags = lsr & LSR_SAVE_FLAGS;
	return lsr;
}

/* Wait for transmitter & holding register to empty */
static void wait_for_xmitr(struct uart_8250_port *up, int bits)
{
	unsigned int status, tmout = 10000;

	/* Wait up to 10ms for the character(s) to be sent. */
	for (;;) {
		status = serial_lsr_in(up);

		if ((status & bits) == (unsigned int)bits)
			break;
		if (--tmout == 0)
			break;
		udelay(1);
		touch_nmi_watchdog();
	}

	/* Wait up to 1s for flow control if necessary */
	if (up->port.flags & UPF_CONS_FLOW) {
		for (tmout = 1000000; tmout; tmout--) {
			unsigned int msr = serial_in(up, UART_MSR);
			up->msr_saved_flags |= msr & 0x0f;
			if (msr & UART_MSR_CTS)
				break;
			udelay(1);
			touch_nmi_watchdog();
		}
	}
}

static void serial8250_console_putchar(struct uart_port *port, unsigned char ch)
{
	struct uart_8250_port *up = up_to_u8250p(port);

	wait_for_xmitr(up, UART_LSR_THRE);
	serial_port_out(port, UART_TX, ch);
}

/* drivers/tty/serial/serial_core.c (another compilation unit: not inlined) */
__attribute__((noinline)) static void uart_console_write(struct uart_port *port, const char *s, unsigned int count,
                               void (*putchar)(struct uart_port *, unsigned char))
{
	unsigned int i;

	for (i = 0; i < count; i++, s++) {
		if (*s == '\n')
			putchar(port, '\r');
		putchar(port, *s);
	}
	port->tx += count;
}

static inline void serial8250_clear_IER(struct uart_8250_port *up) { serial_out(up, UART_IER, 0); }

static inline unsigned long uart_port_lock_irqsave(struct uart_port *up)
{
	unsigned long flags;
	__asm__ volatile("pushfq; popq %0" : "=r"(flags) : : "memory");
	while (__atomic_exchange_n(&up->lock, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
	return flags;
}
static inline void uart_port_unlock_irqrestore(struct uart_port *up, unsigned long flags)
{
	(void)flags;
	__atomic_store_n(&up->lock, 0, __ATOMIC_RELEASE);
}

static int oops_in_progress;

static void serial8250_console_write(struct uart_8250_port *up, const char *s, unsigned int count)
{
	struct uart_port *port = &up->port;
	unsigned long flags;
	unsigned int ier;

	touch_nmi_watchdog();
	flags = uart_port_lock_irqsave(port);

	/* First save the IER then disable the interrupts */
	ier = serial_port_in(port, UART_IER);
	serial8250_clear_IER(up);

	uart_console_write(port, s, count, serial8250_console_putchar);

	/* Finally, wait for transmitter to become empty and restore the IER */
	wait_for_xmitr(up, UART_LSR_BOTH_EMPTY);
	serial_port_out(port, UART_IER, ier);

	if (up->msr_saved_flags && !oops_in_progress)
		up->msr_saved_flags = 0;
	uart_port_unlock_irqrestore(port, flags);
}

struct console {
	char name[16];
	void (*write)(struct console *, const char *, unsigned);
	short flags;
	short index;
	void *data;
	struct console *next;
};

static struct uart_8250_port serial8250_ports[1];

static void univ8250_console_write(struct console *co, const char *s, unsigned int count)
{
	struct uart_8250_port *up = &serial8250_ports[co->index];
	serial8250_console_write(up, s, count);
}

static struct console univ8250_console = { .name = "ttyS", .write = univ8250_console_write, .index = 0 };
static struct console *console_drivers;

/* kernel/printk: one record at a time, formatted then handed to every console */
#define PRINTK_MESSAGE_MAX 256
static char printk_buf[PRINTK_MESSAGE_MAX];
static u32 log_hash = 0x811c9dc5u;
static u64 log_seq;
static bool printk_time = true;	/* CONFIG_PRINTK_TIME, the printk.time parameter */

static int vscnprintf(char *buf, int size, const char *fmt, va_list args)
{
	char *str = buf, *end = buf + size - 1;
	for (; *fmt && str < end; fmt++) {
		if (*fmt != '%') { *str++ = *fmt; continue; }
		fmt++;
		int width = 0, lng = 0; char pad = ' ';
		if (*fmt == '0') { pad = '0'; fmt++; }
		while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') { lng = 1; fmt++; }
		char tmp[24]; int n = 0; unsigned long v; int base = 10, neg = 0;
		switch (*fmt) {
		case 's': { const char *s = va_arg(args, const char *); while (*s && str < end) *str++ = *s++; continue; }
		case 'c': *str++ = (char)va_arg(args, int); continue;
		case 'd': { long x = lng ? va_arg(args, long) : va_arg(args, int); if (x < 0) { neg = 1; x = -x; } v = x; break; }
		case 'u': v = lng ? va_arg(args, unsigned long) : va_arg(args, unsigned); break;
		case 'x': v = lng ? va_arg(args, unsigned long) : va_arg(args, unsigned); base = 16; break;
		default: *str++ = *fmt; continue;
		}
		do { tmp[n++] = "0123456789abcdef"[v % base]; v /= base; } while (v);
		if (neg) tmp[n++] = '-';
		while (width-- > n && str < end) *str++ = pad;
		while (n && str < end) *str++ = tmp[--n];
	}
	*str = 0;
	return str - buf;
}

static void console_unlock_flush(const char *text, unsigned len)
{
	struct console *con;
	for (con = console_drivers; con; con = con->next)
		con->write(con, text, len);
}

static int printk(const char *fmt, ...)
{
	va_list args;
	int len, hdr;
	u64 ts = log_seq * 4113;

	hdr = 0;
	/* "[    0.000000] " */
	char *p = printk_buf;
	unsigned long sec = ts / 1000000, usec = ts % 1000000;
	len = 0;
	(void)hdr;
	if (printk_time) {
		char t[24]; int n = 0; unsigned long s = sec;
		p[len++] = '[';
		do { t[n++] = '0' + s % 10; s /= 10; } while (s);
		while (n < 5) t[n++] = ' ';
		while (n) p[len++] = t[--n];
		p[len++] = '.';
		for (int k = 5; k >= 0; k--) { t[k] = '0' + usec % 10; usec /= 10; }
		for (int k = 0; k < 6; k++) p[len++] = t[k];
		p[len++] = ']';
		p[len++] = ' ';
	}
	va_start(args, fmt);
	len += vscnprintf(printk_buf + len, sizeof(printk_buf) - len, fmt, args);
	va_end(args);
	for (int k = 0; k < len; k++)
		log_hash = rt_fnv(log_hash, (u8)printk_buf[k]);
	log_seq++;
	console_unlock_flush(printk_buf, len);
	return len;
}

static void serial8250_init_port(struct uart_8250_port *up)
{
	struct uart_port *port = &up->port;
	port->iobase = 0x3f8;
	port->iotype = UPIO_PORT;
	port->regshift = 0;
	port->uartclk = 1843200;
	set_io_from_upio(port);
	serial_out(up, UART_LCR, 0x80);
	serial_out(up, 0, 1);
	serial_out(up, 1, 0);
	serial_out(up, UART_LCR, 0x03);
	up->lcr = 0x03;
	serial_out(up, UART_MCR, 0x0b);
	up->mcr = 0x0b;
	serial_out(up, UART_IER, 0x05);
	up->ier = 0x05;
}

/* drivers/tty/serial/8250/8250_early.c: earlycon=uart8250,io,0x3f8 before the real console */
static unsigned int serial8250_early_in(struct uart_port *port, int offset)
{
	offset <<= port->regshift;
	return inb(port->iobase + offset);
}
static void serial8250_early_out(struct uart_port *port, int offset, int value)
{
	offset <<= port->regshift;
	outb(value, port->iobase + offset);
}
static void serial_putc(struct uart_port *port, unsigned char c)
{
	unsigned int status;
	serial8250_early_out(port, UART_TX, c);
	for (;;) {
		status = serial8250_early_in(port, UART_LSR);
		if ((status & UART_LSR_BOTH_EMPTY) == UART_LSR_BOTH_EMPTY)
			break;
		cpu_relax();
	}
}
static struct uart_port early_port = { .iobase = 0x3f8 };
static void early_serial8250_write(struct console *console, const char *s, unsigned int count)
{
	(void)console;
	uart_console_write(&early_port, s, count, serial_putc);
}
static struct console early_con = { .name = "uart8250", .write = early_serial8250_write, .index = -1 };

static const char *const devs[] = { "sda", "vda", "nvme0n1", "sr0", "eth0", "ens3", "loop0" };

int main(const char *cmdline)
{
	unsigned long iters, warmup, i;
	u64 t0 = 0, t1;

	RT_ITERS(cmdline, 300, iters, warmup);
	console_drivers = &early_con;
	printk("Linux version 6.6.0 (gcc version 12.2.0) #1 SMP PREEMPT_DYNAMIC\n");
	printk("earlycon: uart8250 at I/O port 0x3f8 (options '')\n");
	serial8250_init_port(&serial8250_ports[0]);
	console_drivers = &univ8250_console;
	printk("printk: console [ttyS0] enabled\n");
	printk("printk: bootconsole [uart8250] disabled\n");
	for (i = 0; i < iters; i++) {
		if (i == warmup) { rt_marker(1); t0 = rt_tsc(); }
		printk("%s: %lu %u-byte logical blocks: (%lu MB/%lu MiB) seq %lu irq %d\n", devs[i % 7],
		       (unsigned long)(i * 2654435761u % 100000000), 512u, (unsigned long)(i * 977), (unsigned long)(i * 931),
		       (unsigned long)log_seq, (int)(i % 24));
	}
	t1 = rt_tsc();
	rt_marker(2);
	printk_time = false;
	printk("RESULT workload=c-linux8250-earlycon-cpl3 iters=%lu warmup=%lu cycles_per_iter=%lu tx=%lu checksum=0x%08x\n", iters, warmup,
	       (unsigned long)((t1 - t0) / (iters - warmup)), serial8250_ports[0].port.tx, log_hash);
	return 0;
}

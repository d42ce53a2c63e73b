/* c-mmio-widths-cpl3 - the doorbell at every width it answers: STATUS read
 * as a byte, a word, a dword and a qword (the device returns its count at
 * offset 0x04 for any width; compared with the expected count cut to the
 * width), DOORBELL rung with dword stores mostly and with a byte store in
 * every eighth batch (the device takes the byte as the request), and a
 * 16-byte request descriptor copied into the device's reserved registers
 * (0x20-0x2f, which ignore writes) by a memcpy_toio-style loop every fourth
 * batch. Request j carries j * 2654435761 mod 2^32 (the byte store: its low byte).
 * Command line: iters=N (default 4096) warmup=W (default N/10).
 * RESULT checksum: FNV-1a 32 over the completions' result words.
 * Exit status 2: no doorbell; 3: a bad STATUS or completion. */
#include "c/lib.h"
#include "c/serial.h"

#define DB_BASE 0xd0000000UL
#define DB_STATUS 0x04
#define DB_DOORBELL 0x40
#define DB_ID_VALUE 0x4c454244u
#define CQ_ENTRIES 512

static inline u8 readb(const volatile void *a) { return *(const volatile u8 *)a; }
static inline u16 readw(const volatile void *a) { return *(const volatile u16 *)a; }
static inline u32 readl(const volatile void *a) { return *(const volatile u32 *)a; }
static inline u64 readq(const volatile void *a) { return *(const volatile u64 *)a; }
static inline void writeb(u8 v, volatile void *a) { *(volatile u8 *)a = v; }
static inline void writel(u32 v, volatile void *a) { *(volatile u32 *)a = v; }

static void memcpy_toio(volatile void *dst, const void *src, size_t n)
{
	volatile u32 *d = dst;
	const u32 *s = src;

	for (; n >= 4; n -= 4)
		*d++ = *s++;
}

static volatile u8 *const db = (volatile u8 *)DB_BASE;

struct cqe {
	u32 result;
	u32 seq;
};

struct desc {
	u32 tag, len, addr_lo, addr_hi;
};

static struct cqe cq[CQ_ENTRIES] __attribute__((aligned(4096)));
static u32 tail, head, hash = FNV_OFFSET;
static unsigned long width_errors;

static struct uart_port com1;
static struct console serial_console = {
	.name = "ttyS0",
	.write = serial8250_console_write,
	.data = &com1,
};

static int check_widths(unsigned nb)
{
	switch (nb & 3) {
	case 0: return readl(db + DB_STATUS) == tail;
	case 1: return readb(db + DB_STATUS) == (u8)tail;
	case 2: return readw(db + DB_STATUS) == (u16)tail;
	default: return readq(db + DB_STATUS) == (u64)tail;
	}
}

__attribute__((noinline)) static int run(unsigned long from, unsigned long to)
{
	unsigned nb = 0;

	while (from < to) {
		unsigned n = to - from < 16 ? (unsigned)(to - from) : 16;

		if ((nb & 3) == 3) {
			struct desc d = { (u32)from, n, (u32)(unsigned long)cq, 0 };

			memcpy_toio(db + 0x20, &d, sizeof(d));
		}
		for (unsigned k = 0; k < n; k++) {
			u32 v = (u32)(from + k) * 2654435761u;

			if ((nb & 7) == 5 && k == 0)
				writeb((u8)v, db + DB_DOORBELL);
			else
				writel(v, db + DB_DOORBELL);
			tail++;
		}
		if (!check_widths(nb))
			width_errors++;
		if (readl(db + DB_STATUS) != tail) {
			printk("doorbell: STATUS=%u expected=%u\n", readl(db + DB_STATUS), tail);
			return -1;
		}
		while (head != tail) {
			volatile struct cqe *e = &cq[head % CQ_ENTRIES];

			if (e->seq != head + 1)
				return -1;
			hash = fnv1a(hash, (const void *)&e->result, 4);
			head++;
		}
		from += n;
		nb++;
	}
	return 0;
}

int main(const char *cmdline)
{
	struct bench b;
	unsigned long q = (unsigned long)cq;

	serial8250_init_port(&com1, 0x3f8, 115200, UPIO_PORT);
	register_console(&serial_console);
	if (readl(db) != DB_ID_VALUE) {
		printk("doorbell: no device answered\n");
		return 2;
	}
	writel((u32)q, db + 0x08);
	writel((u32)(q >> 32), db + 0x0c);
	writel(CQ_ENTRIES, db + 0x10);
	writel(1, db + 0x14);
	printk("widths: id byte %02x word %04x qword %llx\n", readb(db), readw(db), (unsigned long long)readq(db));
	bench_init(&b, "c-mmio-widths-cpl3", cmdline, 4096);
	if (run(0, b.warmup))
		return 3;
	bench_mark_start(&b);
	if (run(b.warmup, b.iters))
		return 3;
	bench_mark_end(&b);
	printk("tail %u head %u width errors %lu\n", tail, head, width_errors);
	bench_report(&b, hash);
	return 0;
}

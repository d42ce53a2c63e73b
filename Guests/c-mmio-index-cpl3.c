/* c-mmio-index-cpl3 - MMIO addresses computed at run time: the register
 * file as an array of u32 indexed by a register number (`regs[i]`, the index
 * read from a table), an array of device bases (the doorbell listed twice,
 * as a driver that found the same BAR through two functions would), and an
 * MMIO pointer passed as a function argument to out-of-line helpers.
 * Request j carries j * 2654435761 mod 2^32.
 * Command line: iters=N (default 4096) warmup=W (default N/10).
 * RESULT checksum: FNV-1a 32 over the completions' result words.
 * Exit status 2: no doorbell; 3: a bad STATUS or completion. */
#include "c/lib.h"
#include "c/serial.h"

#define DB_ID_VALUE 0x4c454244u
#define CQ_ENTRIES 256

enum { R_ID = 0, R_STATUS = 1, R_CQ_LO = 2, R_CQ_HI = 3, R_CQ_ENTRIES = 4, R_CONTROL = 5, R_ERROR = 6, R_DOORBELL = 16 };

struct cqe {
	u32 result;
	u32 seq;
};

static struct cqe cq[CQ_ENTRIES] __attribute__((aligned(4096)));
static volatile u32 *const bases[2] = { (volatile u32 *)0xd0000000UL, (volatile u32 *)0xd0000000UL };
/* the registers a batch uses, looked up at run time */
static const unsigned char reg_of[2] = { R_DOORBELL, R_STATUS };
static u32 tail, head, hash = FNV_OFFSET;

static struct uart_port com1;
static struct console serial_console = {
	.name = "ttyS0",
	.write = serial8250_console_write,
	.data = &com1,
};

/* the doorbell register's address handed in */
__attribute__((noinline)) static void ring_at(volatile u32 *bell, const u32 *req, unsigned n)
{
	for (unsigned k = 0; k < n; k++)
		*bell = req[k];
}

__attribute__((noinline)) static u32 read_at(volatile u32 *reg)
{
	return *reg;
}

static inline volatile u32 *dev(unsigned which)
{
	return bases[which & 1];
}

static int batch(unsigned which, u32 first, unsigned n)
{
	u32 req[16];
	volatile u32 *r = dev(which);
	u32 st;

	for (unsigned k = 0; k < n; k++)
		req[k] = (first + k) * 2654435761u;
	if (which & 2) {
		/* regs[i] with i from the table */
		for (unsigned k = 0; k < n; k++)
			r[reg_of[0]] = req[k];
		st = r[reg_of[1]];
	} else {
		ring_at(&r[R_DOORBELL], req, n);
		st = read_at(r + reg_of[1]);
	}
	tail += n;
	if (st != tail)
		return -1;
	while (head != tail) {
		volatile struct cqe *e = &cq[head % CQ_ENTRIES];

		if (e->seq != head + 1)
			return -1;
		hash = fnv1a(hash, (const void *)&e->result, 4);
		head++;
	}
	return 0;
}

__attribute__((noinline)) static int run(unsigned long from, unsigned long to)
{
	unsigned which = 0;

	while (from < to) {
		unsigned n = to - from < 16 ? (unsigned)(to - from) : 16;

		if (batch(which++, (u32)from, n)) {
			printk("doorbell: STATUS=%u expected=%u\n", dev(0)[R_STATUS], tail);
			return -1;
		}
		from += n;
	}
	return 0;
}

int main(const char *cmdline)
{
	struct bench b;
	unsigned long q = (unsigned long)cq;
	volatile u32 *r = dev(0);

	serial8250_init_port(&com1, 0x3f8, 115200, UPIO_PORT);
	register_console(&serial_console);
	if (read_at(&r[R_ID]) != DB_ID_VALUE) {
		printk("doorbell: no device answered\n");
		return 2;
	}
	r[R_CQ_LO] = (u32)q;
	r[R_CQ_HI] = (u32)(q >> 32);
	r[R_CQ_ENTRIES] = CQ_ENTRIES;
	r[R_CONTROL] = 1;
	bench_init(&b, "c-mmio-index-cpl3", cmdline, 4096);
	if (run(0, b.warmup))
		return 3;
	bench_mark_start(&b);
	if (run(b.warmup, b.iters))
		return 3;
	bench_mark_end(&b);
	printk("tail %u head %u error %u\n", tail, head, r[R_ERROR]);
	bench_report(&b, hash);
	return 0;
}

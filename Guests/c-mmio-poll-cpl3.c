/* c-mmio-poll-cpl3 - status polling and read-modify-write on the doorbell:
 * STATUS polled in `while (readl(STATUS) != want)` loops with a timeout
 * counter (inlined in two places and once out of line), CONTROL updated by
 * read-modify-write sequences (`v = readl(CONTROL); writel(v | 1, CONTROL)`)
 * every fourth batch, and one request of every batch submitted with an `|=` on
 * the DOORBELL register (one `orl` instruction, inline asm: the device reads
 * DOORBELL as 0, so the request lands as written).
 * Request j carries j * 2654435761 mod 2^32.
 * Command line: iters=N (default 4096) warmup=W (default N/10).
 * RESULT checksum: FNV-1a 32 over the completions' result words.
 * Exit status 2: no doorbell; 3: a bad STATUS or completion. */
#include "c/lib.h"
#include "c/io.h"
#include "c/serial.h"

#define DB_BASE 0xd0000000UL
#define DB_ID 0x00
#define DB_STATUS 0x04
#define DB_CQ_LO 0x08
#define DB_CQ_HI 0x0c
#define DB_CQ_ENTRIES 0x10
#define DB_CONTROL 0x14
#define DB_DOORBELL 0x40
#define DB_ID_VALUE 0x4c454244u
#define CQ_ENTRIES 512
#define POLL_LIMIT 1000000

static inline u32 readl(const volatile void *a)
{
	return *(const volatile u32 *)a;
}

static inline void writel(u32 v, volatile void *a)
{
	*(volatile u32 *)a = v;
}

/* `*reg |= v` as one read-modify-write instruction (gcc splits a volatile
 * `|=` into load, or, store; a kernel's set_bit-style helper does not) */
static inline void or32(u32 v, volatile void *a)
{
	asm volatile("orl %1,%0" : "+m"(*(volatile u32 *)a) : "r"(v) : "memory");
}

#define REG(off) ((volatile u8 *)DB_BASE + (off))

struct cqe {
	u32 result;
	u32 seq;
};

static struct cqe cq[CQ_ENTRIES] __attribute__((aligned(4096)));
static u32 tail, head, hash = FNV_OFFSET;
static unsigned long timeouts, polls;

static struct uart_port com1;
static struct console serial_console = {
	.name = "ttyS0",
	.write = serial8250_console_write,
	.data = &com1,
};

static inline int wait_status(u32 want)
{
	unsigned long spins = 0;

	while (readl(REG(DB_STATUS)) != want) {
		if (++spins > POLL_LIMIT) {
			timeouts++;
			return -1;
		}
		cpu_relax();
	}
	polls += spins + 1;
	return 0;
}

__attribute__((noinline)) static int wait_status_slow(u32 want)
{
	int budget = POLL_LIMIT;

	do {
		if (readl(REG(DB_STATUS)) == want)
			return 0;
		cpu_relax();
	} while (--budget);
	timeouts++;
	return -1;
}

static void enable(void)
{
	u32 v = readl(REG(DB_CONTROL));

	writel(v | 1, REG(DB_CONTROL));
}

static int reap(void)
{
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
	unsigned long nb = 0;
	volatile u32 *bell = (volatile u32 *)REG(DB_DOORBELL);

	while (from < to) {
		unsigned n = to - from < 16 ? (unsigned)(to - from) : 16;
		unsigned k;

		if ((nb & 3) == 0)
			enable();
		/* the first request by |= (DOORBELL reads as 0) */
		or32((u32)from * 2654435761u, bell);
		tail++;
		if (wait_status(tail))
			return -1;
		for (k = 1; k < n; k++) {
			writel((u32)(from + k) * 2654435761u, REG(DB_DOORBELL));
			tail++;
			if (k == n / 2 && wait_status(tail))
				return -1;
		}
		if (((nb & 1) ? wait_status_slow(tail) : wait_status(tail)) || reap()) {
			printk("doorbell: STATUS=%u expected=%u\n", readl(REG(DB_STATUS)), tail);
			return -1;
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
	if (readl(REG(DB_ID)) != DB_ID_VALUE) {
		printk("doorbell: no device answered\n");
		return 2;
	}
	writel((u32)q, REG(DB_CQ_LO));
	writel((u32)(q >> 32), REG(DB_CQ_HI));
	writel(CQ_ENTRIES, REG(DB_CQ_ENTRIES));
	enable();
	bench_init(&b, "c-mmio-poll-cpl3", cmdline, 4096);
	if (run(0, b.warmup))
		return 3;
	bench_mark_start(&b);
	if (run(b.warmup, b.iters))
		return 3;
	bench_mark_end(&b);
	printk("tail %u head %u polls %lu timeouts %lu\n", tail, head, polls, timeouts);
	bench_report(&b, hash);
	return 0;
}

/* c-doorbell-cpl3 - the doorbell workload written in C: a user-space driver
 * for minivmm's doorbell device (Sources/VMMKit/Devices/Doorbell.swift),
 * registers reached through a volatile struct pointer, the completion queue
 * in guest RAM, completions handed to a callback. It probes and sets up the
 * device itself (at CPL3), then submits N requests in batches of up to 16:
 * one DOORBELL store per request, one STATUS read per batch, then reaps the
 * batch's completions. Request j carries j * 2654435761 mod 2^32.
 * Command line: iters=N (default 4096) warmup=W (default N/10).
 * RESULT checksum: FNV-1a 32 over the completions' result words (4 bytes
 * each, little-endian), the same as the assembly doorbell-cpl3's.
 * Exit status 2: no doorbell device; 3: a bad STATUS or completion. */
#include "c/lib.h"
#include "c/serial.h"

#define DB_BASE 0xd0000000UL
#define DB_ID_VALUE 0x4c454244 /* "DBEL" */
#define DB_CQ_ENTRIES 256
#define DB_MAX_BATCH 16

struct doorbell_regs {
	u32 id; /* 0x00 */
	u32 status; /* 0x04: completions written */
	u32 cq_lo; /* 0x08 */
	u32 cq_hi; /* 0x0c */
	u32 cq_entries; /* 0x10 */
	u32 control; /* 0x14: 1 = enabled */
	u32 error; /* 0x18 */
	u32 reserved[9];
	u32 doorbell; /* 0x40 */
};

_Static_assert(__builtin_offsetof(struct doorbell_regs, doorbell) == 0x40, "DOORBELL at 0x40");

struct db_cqe {
	u32 result;
	u32 seq;
};

struct db_queue {
	volatile struct doorbell_regs *regs;
	volatile struct db_cqe *cq;
	u32 entries;
	u32 head; /* completions reaped */
	u32 tail; /* requests submitted */
	void (*complete)(struct db_queue *q, u32 tag, u32 result);
	u32 hash;
};

static struct db_cqe cq_ring[DB_CQ_ENTRIES] __attribute__((aligned(4096)));

static struct uart_port com1;

static struct console serial_console = {
	.name = "ttyS0",
	.write = serial8250_console_write,
	.data = &com1,
};

static void hash_completion(struct db_queue *q, u32 tag, u32 result)
{
	(void)tag;
	q->hash = fnv1a(q->hash, &result, sizeof(result));
}

static int db_probe(struct db_queue *q, unsigned long base)
{
	q->regs = (volatile struct doorbell_regs *)base;
	return q->regs->id == DB_ID_VALUE ? 0 : -1;
}

static void db_setup(struct db_queue *q, struct db_cqe *ring, u32 entries)
{
	unsigned long addr = (unsigned long)ring;

	memset(ring, 0, entries * sizeof(*ring));
	q->cq = ring;
	q->entries = entries;
	q->head = q->tail = 0;
	q->regs->cq_lo = (u32)addr;
	q->regs->cq_hi = (u32)(addr >> 32);
	q->regs->cq_entries = entries;
	q->regs->control = 1;
}

static inline void db_submit(struct db_queue *q, u32 request)
{
	q->regs->doorbell = request;
	q->tail++;
}

static int db_reap(struct db_queue *q)
{
	while (q->head != q->tail) {
		volatile struct db_cqe *e = &q->cq[q->head & (q->entries - 1)];
		u32 seq = e->seq;

		if (seq != q->head + 1) {
			printk("doorbell: completion seq=%u expected=%u\n", seq, q->head + 1);
			return -1;
		}
		q->complete(q, q->head, e->result);
		q->head++;
	}
	return 0;
}

/* Requests [from, to) in batches of up to DB_MAX_BATCH. */
static int db_run(struct db_queue *q, unsigned long from, unsigned long to)
{
	while (from < to) {
		unsigned int n = to - from < DB_MAX_BATCH ? to - from : DB_MAX_BATCH;
		unsigned int j;
		u32 status;

		for (j = 0; j < n; j++)
			db_submit(q, (u32)(from + j) * 2654435761u);
		status = q->regs->status;
		if (status != q->tail) {
			printk("doorbell: STATUS=%u expected=%u\n", status, q->tail);
			return -1;
		}
		if (db_reap(q))
			return -1;
		from += n;
	}
	return 0;
}

int main(const char *cmdline)
{
	struct db_queue q = { .complete = hash_completion, .hash = FNV_OFFSET };
	struct bench b;

	serial8250_init_port(&com1, 0x3f8, 115200, UPIO_PORT);
	register_console(&serial_console);
	if (db_probe(&q, DB_BASE)) {
		printk("doorbell: no device answered\n");
		return 2;
	}
	db_setup(&q, cq_ring, DB_CQ_ENTRIES);
	bench_init(&b, "c-doorbell-cpl3", cmdline, 4096);

	if (db_run(&q, 0, b.warmup))
		return 3;
	bench_mark_start(&b);
	if (db_run(&q, b.warmup, b.iters))
		return 3;
	bench_mark_end(&b);
	bench_report(&b, q.hash);
	return 0;
}

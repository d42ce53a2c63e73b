/* c-mmio-cpl3 - a user-space driver for minivmm's doorbell device written the
 * way Linux drivers spell MMIO, with a runtime of its own: nothing of c/ but
 * the boot path of c/start.s (which calls c_start at CPL3, with the doorbell
 * page user-accessible). Not written by the DMP developers' hand and not
 * shaped for DMP.
 *
 * - readl/writel as inline asm with memory operands on an `__iomem`-style
 *   base pointer plus register offsets (no struct);
 * - a full batch of 16 requests rings the doorbell from a loop that
 *   `#pragma GCC unroll 16` unrolls into 16 separate stores, a short batch
 *   from a plain loop;
 * - the STATUS register polled with a spin budget (timeouts counted);
 * - completions dispatched to a table of handlers (function pointers) by
 *   request class, progress printed every 8 batches by a UART writer of its
 *   own (inlined `in`/`out`, no printf).
 * Request j carries j * 2654435761 mod 2^32.
 * Command line: iters=N (default 4096) warmup=W (default N/10).
 * RESULT checksum: FNV-1a 32 over the completions' result words (4 bytes
 * each, little-endian), the same as doorbell-cpl3's and c-doorbell-cpl3's.
 * Exit status: 0; 2 no doorbell device; 3 a bad STATUS or completion, or
 * the STATUS wait ran out. */
#include <stddef.h>
#include <stdint.h>

#define __iomem volatile

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

/* ---- accessors ---------------------------------------------------------- */

static inline uint32_t readl(const __iomem void *addr)
{
	uint32_t v;

	__asm__ __volatile__("movl %1, %0" : "=r"(v) : "m"(*(const __iomem uint32_t *)addr) : "memory");
	return v;
}

static inline void writel(uint32_t v, __iomem void *addr)
{
	__asm__ __volatile__("movl %0, %1" : : "r"(v), "m"(*(__iomem uint32_t *)addr) : "memory");
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;

	__asm__ __volatile__("inb %w1, %b0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void outb(uint8_t v, uint16_t port)
{
	__asm__ __volatile__("outb %b0, %w1" : : "a"(v), "Nd"(port));
}

static inline void outl(uint32_t v, uint16_t port)
{
	__asm__ __volatile__("outl %0, %w1" : : "a"(v), "Nd"(port));
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
	__asm__ __volatile__("pause" : : : "memory");
}

/* ---- the console -------------------------------------------------------- */

#define COM1 0x3f8
#define COM1_LSR (COM1 + 5)

static unsigned long tx_timeouts;

static void con_putc(char c)
{
	unsigned budget = 1u << 16;

	while (!(inb(COM1_LSR) & 0x20)) {
		if (!--budget) {
			tx_timeouts++;
			break;
		}
	}
	outb((uint8_t)c, COM1);
}

static void con_puts(const char *s)
{
	while (*s)
		con_putc(*s++);
}

static void con_hex(uint32_t v, int digits)
{
	while (digits--)
		con_putc("0123456789abcdef"[(v >> (4 * digits)) & 0xf]);
}

static void con_dec(unsigned long v, int width)
{
	char tmp[24];
	int n = 0;

	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (width-- > n)
		con_putc(' ');
	while (n)
		con_putc(tmp[--n]);
}

/* ---- the doorbell ------------------------------------------------------- */

#define DB_PHYS 0xd0000000UL
#define DB_ID 0x00
#define DB_STATUS 0x04
#define DB_CQ_LO 0x08
#define DB_CQ_HI 0x0c
#define DB_CQ_ENTRIES 0x10
#define DB_CONTROL 0x14
#define DB_ERROR 0x18
#define DB_DOORBELL 0x40
#define DB_ID_VALUE 0x4c454244u
#define DB_BATCH 16
#define CQ_SIZE 512
#define STATUS_SPINS 100000

struct cqe {
	uint32_t result;
	uint32_t seq;
};

struct db_dev;
typedef void (*completion_fn)(struct db_dev *d, uint32_t request, uint32_t result);

struct db_dev {
	__iomem uint8_t *base;
	__iomem struct cqe *cq;
	uint32_t submitted;
	uint32_t reaped;
	uint32_t hash;
	uint32_t per_class[4];
	unsigned long status_timeouts;
	const completion_fn *handlers;
};

static struct cqe cq_mem[CQ_SIZE] __attribute__((aligned(4096)));

static inline uint32_t fnv_word(uint32_t h, uint32_t w)
{
	for (int i = 0; i < 4; i++, w >>= 8)
		h = (h ^ (w & 0xff)) * 0x01000193u;
	return h;
}

static void on_even(struct db_dev *d, uint32_t request, uint32_t result)
{
	(void)request;
	d->per_class[0]++;
	d->hash = fnv_word(d->hash, result);
}

static void on_odd(struct db_dev *d, uint32_t request, uint32_t result)
{
	(void)request;
	d->per_class[1]++;
	d->hash = fnv_word(d->hash, result);
}

static void on_high(struct db_dev *d, uint32_t request, uint32_t result)
{
	d->per_class[2 + (request >> 31)]++;
	d->hash = fnv_word(d->hash, result);
}

static const completion_fn handlers[4] = { on_even, on_odd, on_high, on_high };

static inline uint32_t request_value(uint32_t j)
{
	return j * 2654435761u;
}

static int db_init(struct db_dev *d)
{
	uintptr_t cq = (uintptr_t)cq_mem;

	d->base = (__iomem uint8_t *)DB_PHYS;
	if (readl(d->base + DB_ID) != DB_ID_VALUE)
		return -1;
	memset(cq_mem, 0, sizeof(cq_mem));
	d->cq = cq_mem;
	d->submitted = d->reaped = 0;
	d->hash = 0x811c9dc5u;
	d->handlers = handlers;
	writel(0, d->base + DB_CONTROL);
	writel((uint32_t)cq, d->base + DB_CQ_LO);
	writel((uint32_t)(cq >> 32), d->base + DB_CQ_HI);
	writel(CQ_SIZE, d->base + DB_CQ_ENTRIES);
	writel(1, d->base + DB_CONTROL);
	return readl(d->base + DB_ERROR) == 0 ? 0 : -1;
}

/* Sixteen requests: one store each, unrolled. */
__attribute__((noinline)) static void db_ring_full(struct db_dev *d, const uint32_t *req)
{
	__iomem uint8_t *bell = d->base + DB_DOORBELL;

#pragma GCC unroll 16
	for (int k = 0; k < DB_BATCH; k++)
		writel(req[k], bell);
	d->submitted += DB_BATCH;
}

__attribute__((noinline)) static void db_ring_some(struct db_dev *d, const uint32_t *req, unsigned n)
{
	for (unsigned k = 0; k < n; k++)
		writel(req[k], d->base + DB_DOORBELL);
	d->submitted += n;
}

static int db_wait_status(struct db_dev *d)
{
	unsigned long spins = 0;

	while (readl(d->base + DB_STATUS) != d->submitted) {
		if (++spins == STATUS_SPINS) {
			d->status_timeouts++;
			return -1;
		}
		cpu_relax();
	}
	return 0;
}

static int db_reap(struct db_dev *d, const uint32_t *req)
{
	unsigned k = 0;

	while (d->reaped != d->submitted) {
		__iomem struct cqe *e = &d->cq[d->reaped % CQ_SIZE];

		if (e->seq != d->reaped + 1)
			return -1;
		d->handlers[req[k] & 3](d, req[k], e->result);
		d->reaped++;
		k++;
	}
	return 0;
}

static unsigned long batches;

static int db_batch(struct db_dev *d, uint32_t first, unsigned n)
{
	uint32_t req[DB_BATCH];

	for (unsigned k = 0; k < n; k++)
		req[k] = request_value(first + k);
	if (n == DB_BATCH)
		db_ring_full(d, req);
	else
		db_ring_some(d, req, n);
	if (db_wait_status(d)) {
		con_puts("doorbell: STATUS wait ran out\n");
		return -1;
	}
	if (db_reap(d, req)) {
		con_puts("doorbell: bad completion\n");
		return -1;
	}
	if (++batches % 8 == 0) {
		con_puts("batch ");
		con_dec(batches, 5);
		con_puts(": requests ");
		con_dec(d->submitted, 6);
		con_puts(" hash ");
		con_hex(d->hash, 8);
		con_puts("\n");
	}
	return 0;
}

static int db_run(struct db_dev *d, unsigned long from, unsigned long to)
{
	while (from < to) {
		unsigned n = to - from < DB_BATCH ? (unsigned)(to - from) : DB_BATCH;

		if (db_batch(d, (uint32_t)from, n))
			return -1;
		from += n;
	}
	return 0;
}

/* ---- the command line, the run ----------------------------------------- */

static unsigned long arg(const char *s, const char *key, unsigned long def)
{
	for (; s && *s; s++) {
		const char *k = key, *p = s;
		unsigned long v = 0;

		while (*k && *p == *k)
			k++, p++;
		if (*k || *p != '=')
			continue;
		for (p++; *p >= '0' && *p <= '9'; p++)
			v = v * 10 + (unsigned long)(*p - '0');
		return v;
	}
	return def;
}

int main(const char *cmdline);

int main(const char *cmdline)
{
	static struct db_dev dev;
	unsigned long iters = arg(cmdline, "iters", 4096), warmup;
	uint64_t t0, t1;

	if (iters < 1)
		iters = 1;
	warmup = arg(cmdline, "warmup", iters / 10);
	if (warmup > iters - 1)
		warmup = iters - 1;
	if (db_init(&dev)) {
		con_puts("doorbell: no device answered\n");
		return 2;
	}
	if (db_run(&dev, 0, warmup))
		return 3;
	outl(1, 0x700);
	t0 = rdtsc();
	if (db_run(&dev, warmup, iters))
		return 3;
	t1 = rdtsc();
	outl(2, 0x700);

	con_puts("classes:");
	for (int c = 0; c < 4; c++) {
		con_putc(' ');
		con_dec(dev.per_class[c], 1);
	}
	con_puts(" timeouts: ");
	con_dec(dev.status_timeouts + tx_timeouts, 1);
	con_puts("\nRESULT workload=c-mmio-cpl3 iters=");
	con_dec(iters, 1);
	con_puts(" warmup=");
	con_dec(warmup, 1);
	con_puts(" cycles_per_iter=");
	con_dec((t1 - t0) / (iters - warmup), 1);
	con_puts(" checksum=0x");
	con_hex(dev.hash, 8);
	con_puts("\n");
	return 0;
}

__attribute__((noreturn)) void c_start(const char *cmdline);

void c_start(const char *cmdline)
{
	outb((uint8_t)main(cmdline), 0xf4);
	for (;;)
		cpu_relax();
}

/* bench.c - what every workload guest does to measure itself (the same
 * protocol as the assembly workloads, Guests/README.md): marker port 0x700
 * <- 1 then rdtsc at the start of the steady phase, rdtsc then 0x700 <- 2
 * at its end, and the RESULT line. */
#include "lib.h"
#include "io.h"

#define MARKER_PORT 0x700

/* iters=N (at least 1), warmup=W (default N/10, at most N - 1). */
void bench_init(struct bench *b, const char *name, const char *cmdline, unsigned long default_iters)
{
	b->name = name;
	b->iters = cmdline_ulong(cmdline, "iters", default_iters);
	if (b->iters < 1)
		b->iters = 1;
	b->warmup = cmdline_ulong(cmdline, "warmup", b->iters / 10);
	if (b->warmup > b->iters - 1)
		b->warmup = b->iters - 1;
	b->tsc_start = b->tsc_end = 0;
}

void bench_mark_start(struct bench *b)
{
	outl(1, MARKER_PORT);
	b->tsc_start = rdtsc();
}

void bench_mark_end(struct bench *b)
{
	b->tsc_end = rdtsc();
	outl(2, MARKER_PORT);
}

void bench_report(const struct bench *b, u32 checksum)
{
	u64 cycles = (b->tsc_end - b->tsc_start) / (b->iters - b->warmup);

	printk("RESULT workload=%s iters=%lu warmup=%lu cycles_per_iter=%llu checksum=0x%08x\n",
	       b->name, b->iters, b->warmup, (unsigned long long)cycles, checksum);
}

u32 fnv1a(u32 hash, const void *data, size_t len)
{
	const u8 *p = data;

	while (len--)
		hash = (hash ^ *p++) * FNV_PRIME;
	return hash;
}

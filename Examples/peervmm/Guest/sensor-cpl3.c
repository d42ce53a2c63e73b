/* sensor-cpl3 - peervmm's guest: drives the sensor block (peervmm's own
 * device, MMIO at 0xd0100000) from CPL3 with gcc -O2 code nobody shaped for
 * DMP: for each of N samples it polls STATUS until READY, writes the sample
 * to DATA and hashes it; every 256 samples it reads COUNT and checks that the
 * block took every sample so far; every 2048 a progress line. Halfway through
 * it disables the block, checks that STATUS is not READY, writes one sample
 * (the block drops it) and enables it again. At the end it compares the
 * block's COUNT, HASH and DROPPED with its own.
 * Command line: iters=N (default 16384) warmup=W (default N/8).
 * Output: progress lines, then
 *   RESULT workload=sensor-cpl3 iters=N count=C dropped=D checksum=0x...
 * (no timing: the output is the same run after run, DMP on or off).
 * Exit status 0; 2: no sensor block; 3: a check failed. */
#include "c/lib.h"
#include "c/io.h"
#include "c/serial.h"

#define SN_BASE 0xd0100000UL
#define SN_ID 0x00
#define SN_STATUS 0x04
#define SN_CONTROL 0x08
#define SN_DATA 0x0c
#define SN_COUNT 0x10
#define SN_HASH 0x14
#define SN_DROPPED 0x18
#define SN_ID_VALUE 0x534e5350u
#define SN_READY 1u
#define SN_ENABLE 1u
#define SN_RESET 2u
#define POLL_LIMIT 1000000

static inline u32 readl(const volatile void *a)
{
	return *(const volatile u32 *)a;
}

static inline void writel(u32 v, volatile void *a)
{
	*(volatile u32 *)a = v;
}

#define REG(off) ((volatile u8 *)SN_BASE + (off))

static u32 hash = FNV_OFFSET;
static unsigned long timeouts;

static struct uart_port com1;
static struct console serial_console = {
	.name = "ttyS0",
	.write = serial8250_console_write,
	.data = &com1,
};

static inline u32 sample_of(unsigned long i)
{
	return (u32)i * 2654435761u ^ (u32)(i >> 3);
}

static inline int wait_ready(void)
{
	unsigned long spins = 0;

	while (!(readl(REG(SN_STATUS)) & SN_READY)) {
		if (++spins > POLL_LIMIT) {
			timeouts++;
			return -1;
		}
		cpu_relax();
	}
	return 0;
}

__attribute__((noinline)) static int run(unsigned long from, unsigned long to)
{
	unsigned long i;

	for (i = from; i < to; i++) {
		u32 s = sample_of(i);

		if (wait_ready())
			return -1;
		writel(s, REG(SN_DATA));
		hash = fnv1a(hash, &s, 4);
		if ((i & 255) == 255) {
			u32 c = readl(REG(SN_COUNT));

			if (c != (u32)(i + 1)) {
				printk("sensor: COUNT=%u after %lu samples\n", c, i + 1);
				return -1;
			}
		}
		if ((i & 2047) == 2047)
			printk("sensor line %05lu count %u hash %08x\n", i + 1, readl(REG(SN_COUNT)), hash);
	}
	return 0;
}

/* The block leaves its fast paths' preconditions: disabled, it is not READY
 * and drops samples. */
__attribute__((noinline)) static int excursion(void)
{
	u32 status;

	writel(0, REG(SN_CONTROL));
	status = readl(REG(SN_STATUS));
	writel(0xdeadbeef, REG(SN_DATA));
	writel(SN_ENABLE, REG(SN_CONTROL));
	if (status & SN_READY) {
		printk("sensor: READY while disabled\n");
		return -1;
	}
	return 0;
}

int main(const char *cmdline)
{
	struct bench b;
	u32 count, dev_hash, dropped;

	serial8250_init_port(&com1, 0x3f8, 115200, UPIO_PORT);
	register_console(&serial_console);
	if (readl(REG(SN_ID)) != SN_ID_VALUE) {
		printk("sensor: no device answered\n");
		return 2;
	}
	writel(SN_ENABLE | SN_RESET, REG(SN_CONTROL));
	bench_init(&b, "sensor-cpl3", cmdline, 16384);
	b.warmup = cmdline_ulong(cmdline, "warmup", b.iters / 8);
	if (b.warmup > b.iters - 1)
		b.warmup = b.iters - 1;
	if (run(0, b.warmup))
		return 3;
	bench_mark_start(&b);
	if (run(b.warmup, b.iters / 2 > b.warmup ? b.iters / 2 : b.warmup) || excursion() ||
	    run(b.iters / 2 > b.warmup ? b.iters / 2 : b.warmup, b.iters))
		return 3;
	bench_mark_end(&b);
	count = readl(REG(SN_COUNT));
	dev_hash = readl(REG(SN_HASH));
	dropped = readl(REG(SN_DROPPED));
	printk("RESULT workload=sensor-cpl3 iters=%lu count=%u dropped=%u checksum=0x%08x\n",
	       b.iters, count, dropped, hash);
	if (count != (u32)b.iters || dev_hash != hash || dropped != 1 || timeouts) {
		printk("sensor: device count=%u hash=%08x dropped=%u timeouts=%lu\n", count, dev_hash, dropped,
		       timeouts);
		return 3;
	}
	return 0;
}

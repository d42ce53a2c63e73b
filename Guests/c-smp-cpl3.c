/* c-smp-cpl3 - an SMP guest written in C: both vCPUs (APIC IDs 0 and 1, both
 * entered at the image's PVH entry; c/start.s assembled with SMP=1 drops each to CPL3 on a
 * stack of its own) print N lines each, tagged with their CPU
 * (`cpuC line NNNNN key XXXXXXXX`), under one spinlock taken with
 * `lock cmpxchg`. The CPU number is per-CPU data read as %gs:0, the way a
 * kernel reads it (CPUID at CPL3 does not exit under every hypervisor).
 *   style=0 (default): each line formatted with snprintf and written with
 *     console_write through the runtime's 8250 driver with slow accessors
 *     (io_serial_in_slow/io_serial_out_slow: an access, then a port-0x80
 *     delay), reached through the port's function pointers, under the lock.
 *   style=1: each line written by console_line, which takes the lock itself,
 *     polls LSR and writes THR with inlined inb/outb, and counts every byte
 *     and every poll in shared counters with `lock add` (RIP-relative): the
 *     port accesses, the lock word and the locked counters in one function
 *     that both vCPUs run.
 * Warm-up lines, a barrier, the steady phase between the markers, a barrier;
 * then the BSP prints `sums cpu0=0x... cpu1=0x... bytes=B` (each CPU's
 * FNV-1a hash over its own lines, the bytes written) and the RESULT line
 * (checksum: FNV-1a of both hashes). Each CPU's lines come in its order; how
 * the two CPUs' lines interleave depends on the host's scheduling.
 * Command line: iters=N (default 400) warmup=W (default N/10) style=0|1.
 * Exit status 4: the other vCPU did not arrive at a barrier (no second vCPU). */
#include "c/lib.h"
#include "c/io.h"
#include "c/serial.h"

#define COM1 0x3f8
/* TSC cycles a vCPU waits at a barrier for the other. */
#define BARRIER_BUDGET (1ULL << 34)

typedef struct {
	volatile int locked;
} spinlock_t;

static inline unsigned int smp_processor_id(void)
{
	unsigned int cpu;

	asm volatile("movl %%gs:0, %0" : "=r"(cpu));
	return cpu;
}

static inline void spin_lock(spinlock_t *l)
{
	int old;

	for (;;) {
		old = 0;
		asm volatile("lock cmpxchgl %2, %1" : "+a"(old), "+m"(l->locked) : "r"(1) : "memory");
		if (old == 0)
			return;
		while (l->locked)
			cpu_relax();
	}
}

static inline void spin_unlock(spinlock_t *l)
{
	__atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE);
}

/* Wait, at most `budget` TSC cycles, until *flag >= want; 0 if it did. */
static int wait_flag(volatile u32 *flag, u32 want, u64 budget)
{
	u64 t0 = rdtsc();

	while (__atomic_load_n(flag, __ATOMIC_ACQUIRE) < want) {
		if (rdtsc() - t0 > budget)
			return -1;
		cpu_relax();
	}
	return 0;
}

static struct uart_port com1;
static struct console serial_console = {
	.name = "ttyS0",
	.write = serial8250_console_write,
	.data = &com1,
};
static spinlock_t print_lock;
static volatile u32 arrived[2];
static volatile u32 up;
static volatile u32 sums[2];
static unsigned long tx_bytes, tx_polls;

static void barrier_wait(unsigned int cpu, u32 phase)
{
	__atomic_store_n(&arrived[cpu], phase, __ATOMIC_RELEASE);
	if (wait_flag(&arrived[cpu ^ 1], phase, BARRIER_BUDGET))
		exit(4);
}

/* style=1: the lock, the port accesses and the locked counters in one function. */
static void console_line(const char *s, int n)
{
	int k;

	spin_lock(&print_lock);
	for (k = 0; k < n; k++) {
		unsigned int budget = 100000;

		while (!(inb(COM1 + UART_LSR) & UART_LSR_THRE) && --budget)
			__atomic_fetch_add(&tx_polls, 1, __ATOMIC_RELAXED);
		outb(s[k], COM1);
		__atomic_fetch_add(&tx_bytes, 1, __ATOMIC_RELAXED);
	}
	spin_unlock(&print_lock);
}

static void write_line(unsigned long style, const char *s, int n)
{
	if (style) {
		console_line(s, n);
		return;
	}
	spin_lock(&print_lock);
	console_write(s, n);
	tx_bytes += n;
	spin_unlock(&print_lock);
}

static u32 line(unsigned long style, unsigned int cpu, unsigned long i, u32 h)
{
	char buf[64];
	u32 key = (u32)(i * 2654435761u) ^ (cpu ? 0xa5a5a5a5u : 0);
	int n = snprintf(buf, sizeof(buf), "cpu%u line %05lu key %08x\n", cpu, i, key);

	write_line(style, buf, n);
	return fnv1a(h, buf, n);
}

int main(const char *cmdline)
{
	unsigned int cpu = smp_processor_id();
	unsigned long style = cmdline_ulong(cmdline, "style", 0);
	struct bench b;
	unsigned long i;
	u32 h = FNV_OFFSET;
	char buf[64];
	int n;

	if (cpu == 0) {
		serial8250_init_port(&com1, COM1, 115200, UPIO_PORT_SLOW);
		register_console(&serial_console);
		__atomic_store_n(&up, 1, __ATOMIC_RELEASE);
	} else if (wait_flag(&up, 1, BARRIER_BUDGET)) {
		for (;;)
			cpu_relax();
	}
	bench_init(&b, "c-smp-cpl3", cmdline, 400);
	for (i = 0; i < b.warmup; i++)
		h = line(style, cpu, i, h);
	barrier_wait(cpu, 1);
	if (cpu == 0)
		bench_mark_start(&b);
	for (; i < b.iters; i++)
		h = line(style, cpu, i, h);
	barrier_wait(cpu, 2);
	sums[cpu] = h;
	barrier_wait(cpu, 3);
	if (cpu != 0)
		for (;;)
			cpu_relax();
	bench_mark_end(&b);
	n = snprintf(buf, sizeof(buf), "sums cpu0=0x%08x cpu1=0x%08x bytes=%lu\n", sums[0], sums[1], tx_bytes);
	write_line(style, buf, n);
	bench_report(&b, fnv1a(sums[0], (const void *)&sums[1], 4));
	return 0;
}

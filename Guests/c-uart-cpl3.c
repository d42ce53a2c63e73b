/* c-uart-cpl3 - the UART workload written in C: N formatted console lines
 * through the 8250 polling driver of c/serial8250.c (a port with ISA
 * recovery delays: port 0x80 after every register access), printk-style
 * formatting, a console reached through function pointers. Runs at CPL3.
 * Command line: iters=N (default 200) warmup=W (default N/10).
 * RESULT checksum: FNV-1a 32 over the bytes of the N lines. */
#include "c/lib.h"
#include "c/serial.h"

static struct uart_port com1;

static struct console serial_console = {
	.name = "ttyS0",
	.write = serial8250_console_write,
	.data = &com1,
};

static const char *const words[] = {
	"alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
	"india", "juliett", "kilo", "lima", "mike",
};

int main(const char *cmdline)
{
	struct bench b;
	char line[96];
	u32 hash = FNV_OFFSET, sum = 0;
	unsigned long i;

	serial8250_init_port(&com1, 0x3f8, 115200, UPIO_PORT_SLOW);
	register_console(&serial_console);
	bench_init(&b, "c-uart-cpl3", cmdline, 200);

	for (i = 0; i < b.iters; i++) {
		int n;

		if (i == b.warmup)
			bench_mark_start(&b);
		sum = sum * 31 + (u32)i;
		n = snprintf(line, sizeof(line), "line %5lu: %-8s sum=%08x mod7=%d\n", i,
			     words[i % ARRAY_SIZE(words)], sum, (int)(i % 7) - 3);
		if (n >= (int)sizeof(line))
			n = sizeof(line) - 1;
		hash = fnv1a(hash, line, n);
		console_write(line, n);
	}
	bench_mark_end(&b);
	bench_report(&b, hash);
	return 0;
}

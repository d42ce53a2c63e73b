/* c-console-cpl3 - N lines through printk and an early console, the way a
 * kernel prints before its real console driver is up: the console's write
 * function, reached only through the console's function pointer, polls
 * LSR.THRE before each byte (inb/outb inlined). Built at -Os
 * (c-console-cpl3-Os): the write function starts with a 2-byte
 * instruction, has no padding around it, its loops hold only short
 * instructions and its port numbers are loaded before the loops. Runs at CPL3.
 * Command line: iters=N (default 200) warmup=W (default N/10).
 * RESULT checksum: FNV-1a 32 over the bytes of the N lines. */
#include "c/lib.h"
#include "c/io.h"

#define COM1 0x3f8
#define LSR_THRE 0x20

static void early_console_write(struct console *con, const char *s, unsigned int count)
{
	(void)con;
	while (count--) {
		while (!(inb(COM1 + 5) & LSR_THRE))
			;
		outb((u8)*s++, COM1);
	}
}

static struct console early_console = { .name = "early", .write = early_console_write };

int main(const char *cmdline)
{
	struct bench b;
	u32 hash = FNV_OFFSET;
	unsigned long i;

	register_console(&early_console);
	bench_init(&b, "c-console-cpl3", cmdline, 200);
	for (i = 0; i < b.iters; i++) {
		char line[64];
		int n;

		if (i == b.warmup)
			bench_mark_start(&b);
		n = snprintf(line, sizeof(line), "early console line %lu\n", i * 2654435761ul);
		hash = fnv1a(hash, line, n);
		printk("%s", line);
	}
	bench_mark_end(&b);
	bench_report(&b, hash);
	return 0;
}

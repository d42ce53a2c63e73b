/* c-poll-cpl3 - the naive way to print from C: a polling putc written out in
 * the loop that builds each line (inb/outb inlined into main, the status poll
 * a 2-byte loop), a hand-rolled decimal conversion, no driver layer. main runs
 * once and never returns to its caller until the end. Runs at CPL3.
 * Command line: iters=N (default 200) warmup=W (default N/10).
 * RESULT checksum: FNV-1a 32 over the bytes of the N lines. */
#include "c/lib.h"
#include "c/io.h"

#define COM1 0x3f8
#define LSR_THRE 0x20

/* The console bench_report prints through: the same poll, out of line. */
static void poll_console_write(struct console *con, const char *s, unsigned int count)
{
	(void)con;
	while (count--) {
		while (!(inb(COM1 + 5) & LSR_THRE))
			;
		outb((u8)*s++, COM1);
	}
}

static struct console poll_console = { .name = "poll", .write = poll_console_write };

int main(const char *cmdline)
{
	struct bench b;
	u32 hash = FNV_OFFSET;
	unsigned long i;

	register_console(&poll_console);
	bench_init(&b, "c-poll-cpl3", cmdline, 200);
	for (i = 0; i < b.iters; i++) {
		char line[48], digits[24];
		unsigned long v = i * 2654435761ul;
		int n = 0, d = 0;
		const char *p = "tick ";

		if (i == b.warmup)
			bench_mark_start(&b);
		while (*p)
			line[n++] = *p++;
		do {
			digits[d++] = (char)('0' + v % 10);
			v /= 10;
		} while (v);
		while (d)
			line[n++] = digits[--d];
		line[n++] = '\n';
		hash = fnv1a(hash, line, n);
		for (int j = 0; j < n; j++) {
			while (!(inb(COM1 + 5) & LSR_THRE))
				;
			outb((u8)line[j], COM1);
		}
	}
	bench_mark_end(&b);
	bench_report(&b, hash);
	return 0;
}

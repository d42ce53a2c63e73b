/* c-selfmod-cpl3 - a guest written in C that rewrites its own code: N
 * console lines through an early-printk style console (a polling putc on a
 * global port base, as in Linux's boot code), each carrying a key computed
 * by line_key() and printed by a leaf that keeps its digits on the stack
 * (in the red zone) while it polls the UART. The run has four epochs; at the start of each later epoch
 * the guest patches the 32-bit constant inside line_key's machine code (the
 * identity map is writable) and calls it again through its ops table, as
 * kernels do with alternatives and static calls. Runs at CPL3.
 * Command line: iters=N (default 200) warmup=W (default N/10).
 * RESULT checksum: FNV-1a 32 over the bytes of the N lines.
 * Exit status 3: the patch was not found or did not take. */
#include "c/lib.h"
#include "c/io.h"

#define TXR 0 /* transmit register */
#define LSR 5 /* line status */
#define XMTRDY 0x20

#define KEY_SALT 0x5bd1e995u
#define SALT_STEP 0x01000193u
#define EPOCHS 4

static unsigned long early_serial_base;

static void early_serial_init(unsigned long port)
{
	outb(0x3, port + 3); /* 8n1 */
	outb(0, port + 1); /* no interrupts */
	outb(0, port + 2); /* no FIFO */
	outb(0x3, port + 4); /* DTR + RTS */
	early_serial_base = port;
}

static void early_serial_putc(unsigned char ch)
{
	unsigned int timeout = 0xffff;

	while ((inb(early_serial_base + LSR) & XMTRDY) == 0 && --timeout)
		cpu_relax();
	outb(ch, early_serial_base + TXR);
}

static void early_serial_write(struct console *con, const char *s, unsigned int n)
{
	(void)con;
	while (n--)
		early_serial_putc(*s++);
}

/* Eight hex digits and a newline straight to the UART, as boot code prints
 * numbers; returns `hash` updated with the nine bytes. */
u32 early_puthex(u32 v, u32 hash);

u32 early_puthex(u32 v, u32 hash)
{
	static const char hex[] = "0123456789abcdef";
	char buf[9];
	int i;

	for (i = 7; i >= 0; i--, v >>= 4)
		buf[i] = hex[v & 15];
	buf[8] = '\n';
	for (i = 0; i < 9; i++) {
		hash = (hash ^ (u8)buf[i]) * FNV_PRIME;
		early_serial_putc(buf[i]);
	}
	return hash;
}

static struct console early_console = {
	.name = "earlyser",
	.write = early_serial_write,
};

/* The key of line i; KEY_SALT is rewritten in the machine code. */
static __attribute__((noinline)) u32 line_key(u32 i)
{
	return (i * 2654435761u) ^ KEY_SALT;
}

struct line_ops {
	u32 (*key)(u32 i);
};

struct line_ops line_ops = { .key = line_key };

/* Replace the first occurrence of the 32-bit value `old` within the first
 * `len` bytes of `fn`'s code by `new`. */
static int text_poke_imm32(void *fn, size_t len, u32 old, u32 new)
{
	u8 *p = fn;
	size_t i;

	for (i = 0; i + sizeof(old) <= len; i++) {
		if (!memcmp(p + i, &old, sizeof(old))) {
			memcpy(p + i, &new, sizeof(new));
			barrier();
			return 0;
		}
	}
	return -1;
}

int main(const char *cmdline)
{
	struct bench b;
	char line[64];
	u32 hash = FNV_OFFSET, salt = KEY_SALT;
	unsigned long i;
	unsigned int epoch = 0;

	early_serial_init(0x3f8);
	register_console(&early_console);
	bench_init(&b, "c-selfmod-cpl3", cmdline, 200);

	for (i = 0; i < b.iters; i++) {
		unsigned int e = i * EPOCHS / b.iters;
		int n;

		if (i == b.warmup)
			bench_mark_start(&b);
		if (e != epoch) {
			u32 next = KEY_SALT + e * SALT_STEP;

			if (text_poke_imm32(line_ops.key, 32, salt, next)) {
				printk("selfmod: constant 0x%08x not found in line_key\n", salt);
				return 3;
			}
			if (line_ops.key(0) != next) {
				printk("selfmod: line_key(0)=0x%08x after the patch, expected 0x%08x\n",
				       line_ops.key(0), next);
				return 3;
			}
			salt = next;
			epoch = e;
		}
		n = snprintf(line, sizeof(line), "line %5lu: epoch %u key=", i, epoch);
		if (n >= (int)sizeof(line))
			n = sizeof(line) - 1;
		hash = fnv1a(hash, line, n);
		console_write(line, n);
		hash = early_puthex(line_ops.key(i), hash);
	}
	bench_mark_end(&b);
	bench_report(&b, hash);
	return 0;
}

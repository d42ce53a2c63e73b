/* c-boot-cpl3 - a guest that owes nothing to this repository's boot code: its
 * own PVH note and 32-bit entry (top-level asm in this file), page tables it
 * builds at run time in .bss (the first GiB, 2 MiB pages, all user), a GDT,
 * a TSS whose I/O bitmap allows only the ports it uses, no IDT, and its own
 * linker script (c-boot-cpl3.ld: code, read-only data, data and bss packed one
 * after the other, no page alignment). Written as someone targeting minivmm's
 * platform from its documentation would; not shaped for DMP.
 *
 * At CPL3 it formats log lines into a ring buffer and drains the buffer to
 * the UART when a line ends (polled LSR with a spin budget, always-inline
 * accessors); each line carries a CRC-32 computed with a table built at start.
 * Command line: iters=N (default 200) warmup=W (default N/10).
 * RESULT checksum: FNV-1a 32 over the bytes of the N lines.
 * Exit status 0; 5 if the transmitter wait ever ran out. */
#include <stddef.h>
#include <stdint.h>

#define __always_inline inline __attribute__((always_inline))

/* ---- the PVH entry: 32-bit protected mode, paging off, EBX = start_info --- */

__asm__(
	".section .note.Xen, \"a\", @note\n"
	"	.balign 4\n"
	"	.long 4, 4, 18\n" /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
	"	.asciz \"Xen\"\n"
	"	.long pvh_entry\n"
	".section .text.entry, \"ax\", @progbits\n"
	"	.code32\n"
	"	.globl pvh_entry\n"
	"	.type pvh_entry, @function\n"
	"pvh_entry:\n"
	"	cli\n"
	"	mov %ebx, %esi\n"
	"	mov $boot_pd, %edi\n"
	"	xor %ecx, %ecx\n"
	"1:	mov %ecx, %eax\n"
	"	shl $21, %eax\n"
	"	or $0x87, %eax\n" /* present, writable, user, 2 MiB */
	"	mov %eax, (%edi,%ecx,8)\n"
	"	movl $0, 4(%edi,%ecx,8)\n"
	"	inc %ecx\n"
	"	cmp $512, %ecx\n"
	"	jb 1b\n"
	"	mov $boot_pd + 7, %eax\n"
	"	mov %eax, boot_pdpt\n"
	"	mov $boot_pdpt + 7, %eax\n"
	"	mov %eax, boot_pml4\n"
	"	mov %cr4, %eax\n"
	"	or $0x20, %eax\n" /* PAE */
	"	mov %eax, %cr4\n"
	"	mov $boot_pml4, %eax\n"
	"	mov %eax, %cr3\n"
	"	mov $0xc0000080, %ecx\n"
	"	rdmsr\n"
	"	or $0x100, %eax\n" /* EFER.LME */
	"	wrmsr\n"
	"	mov %cr0, %eax\n"
	"	or $0x80000001, %eax\n" /* PG, PE */
	"	mov %eax, %cr0\n"
	"	lgdt gdt_desc\n"
	"	ljmp $0x08, $long_entry\n"
	"	.code64\n"
	"long_entry:\n"
	"	mov $0x10, %eax\n"
	"	mov %eax, %ds\n"
	"	mov %eax, %es\n"
	"	mov %eax, %ss\n"
	"	mov $boot_stack + 16384, %rsp\n"
	"	mov %esi, %edi\n"
	"	call kernel_main\n"
	"2:	hlt\n"
	"	jmp 2b\n"
	"	.size pvh_entry, . - pvh_entry\n"
	"	.text\n");

uint64_t boot_pml4[512] __attribute__((aligned(4096)));
uint64_t boot_pdpt[512] __attribute__((aligned(4096)));
uint64_t boot_pd[512] __attribute__((aligned(4096)));
uint8_t boot_stack[16384] __attribute__((aligned(16)));
static uint8_t user_stack[16384] __attribute__((aligned(16)));

/* ---- descriptors ---------------------------------------------------------- */

uint64_t gdt[7] __attribute__((aligned(16))) = {
	0,
	0x00af9a000000ffffull, /* 0x08 kernel code, 64-bit */
	0x00cf92000000ffffull, /* 0x10 kernel data */
	0x00cff2000000ffffull, /* 0x18 user data */
	0x00affa000000ffffull, /* 0x20 user code, 64-bit */
	0, 0,                  /* 0x28 TSS, filled in by kernel_main */
};

struct __attribute__((packed)) {
	uint16_t limit;
	uint64_t base;
} gdt_desc = { sizeof(gdt) - 1, (uint64_t)(uintptr_t)gdt };

struct __attribute__((packed)) tss {
	uint32_t reserved0;
	uint64_t rsp[3];
	uint64_t reserved1;
	uint64_t ist[7];
	uint64_t reserved2;
	uint16_t reserved3;
	uint16_t iomap_base;
	uint8_t iomap[0x800 / 8 + 1];
};

static struct tss tss;
static uint8_t kernel_stack[8192] __attribute__((aligned(16)));

#define COM1 0x3f8
#define DEBUG_EXIT 0xf4
#define MARKER 0x700

static void allow_ports(uint16_t first, unsigned count)
{
	for (unsigned p = first; p < first + count; p++)
		tss.iomap[p / 8] &= (uint8_t)~(1u << (p % 8));
}

/* ---- port I/O -------------------------------------------------------------- */

static __always_inline uint8_t inb(uint16_t port)
{
	uint8_t v;

	__asm__ __volatile__("inb %w1, %b0" : "=a"(v) : "Nd"(port));
	return v;
}

static __always_inline void outb(uint16_t port, uint8_t v)
{
	__asm__ __volatile__("outb %b0, %w1" : : "a"(v), "Nd"(port));
}

static __always_inline void outl(uint16_t port, uint32_t v)
{
	__asm__ __volatile__("outl %0, %w1" : : "a"(v), "Nd"(port));
}

static __always_inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

/* ---- CPL0: set up and leave ------------------------------------------------ */

static char cmdline[256];

void user_main(void) __attribute__((noreturn));
void kernel_main(uint32_t start_info) __attribute__((noreturn));

void kernel_main(uint32_t start_info)
{
	const uint32_t *si = (const uint32_t *)(uintptr_t)start_info;
	uint64_t base = (uint64_t)(uintptr_t)&tss, limit = sizeof(tss) - 1;

	/* hvm_start_info: magic, version, flags, nr_modules, modlist_paddr (8), cmdline_paddr (8). */
	if (si && si[0] == 0x336ec578) {
		const char *c = (const char *)(uintptr_t)(si[6] | ((uint64_t)si[7] << 32));
		unsigned n = 0;

		while (c && c[n] && n < sizeof(cmdline) - 1) {
			cmdline[n] = c[n];
			n++;
		}
		cmdline[n] = 0;
	}
	tss.rsp[0] = (uint64_t)(uintptr_t)(kernel_stack + sizeof(kernel_stack));
	tss.iomap_base = offsetof(struct tss, iomap);
	for (unsigned k = 0; k < sizeof(tss.iomap); k++)
		tss.iomap[k] = 0xff;
	allow_ports(COM1, 8);
	allow_ports(DEBUG_EXIT, 1);
	allow_ports(MARKER, 4);
	gdt[5] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) | (((limit >> 16) & 0xf) << 48) |
		 (((base >> 24) & 0xff) << 56);
	gdt[6] = base >> 32;
	__asm__ __volatile__("ltr %w0" : : "r"(0x28));
	__asm__ __volatile__("mov $0x1b, %%eax\n\t"
			     "mov %%eax, %%ds\n\t"
			     "mov %%eax, %%es\n\t"
			     "pushq $0x1b\n\t"
			     "pushq %1\n\t"
			     "pushq $0x3002\n\t" /* IOPL 3, IF 0 */
			     "pushq $0x23\n\t"
			     "pushq %0\n\t"
			     "iretq"
			     :
			     : "r"((uint64_t)(uintptr_t)user_main),
			       "r"((uint64_t)(uintptr_t)(user_stack + sizeof(user_stack)))
			     : "rax", "memory");
	__builtin_unreachable();
}

/* ---- CPL3: a ring-buffered console ----------------------------------------- */

#define LOG_SIZE 1024

static char log_ring[LOG_SIZE];
static unsigned log_head, log_tail;
static unsigned long tx_timeouts;
static uint32_t out_hash = 0x811c9dc5u;
static int hashing;

static __always_inline void uart_tx(char c)
{
	unsigned spins = 50000;

	while (__builtin_expect(!(inb(COM1 + 5) & 0x20), 0)) {
		if (!--spins) {
			tx_timeouts++;
			break;
		}
	}
	outb(COM1, (uint8_t)c);
}

static void log_drain(void)
{
	while (log_tail != log_head) {
		char c = log_ring[log_tail++ % LOG_SIZE];

		if (hashing)
			out_hash = (out_hash ^ (uint8_t)c) * 0x01000193u;
		uart_tx(c);
	}
}

static void log_char(char c)
{
	if (log_head - log_tail == LOG_SIZE)
		log_drain();
	log_ring[log_head++ % LOG_SIZE] = c;
	if (c == '\n')
		log_drain();
}

static void log_str(const char *s)
{
	while (*s)
		log_char(*s++);
}

static void log_num(uint64_t v, unsigned base, int width, char pad)
{
	char tmp[24];
	int n = 0;

	do {
		tmp[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (width-- > n)
		log_char(pad);
	while (n)
		log_char(tmp[--n]);
}

static uint32_t crc_table[256];

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;

		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

static uint32_t crc32(const void *p, size_t n)
{
	const uint8_t *b = p;
	uint32_t c = 0xffffffffu;

	while (n--)
		c = crc_table[(c ^ *b++) & 0xff] ^ (c >> 8);
	return ~c;
}

static unsigned long arg(const char *key, unsigned long def)
{
	for (const char *s = cmdline; *s; s++) {
		const char *k = key, *p = s;
		unsigned long v = 0;

		if (s != cmdline && s[-1] != ' ')
			continue;
		while (*k && *p == *k) {
			k++;
			p++;
		}
		if (*k || *p != '=')
			continue;
		for (p++; *p >= '0' && *p <= '9'; p++)
			v = v * 10 + (unsigned long)(*p - '0');
		return v;
	}
	return def;
}

void user_main(void)
{
	unsigned long iters = arg("iters", 200), warmup;
	uint64_t t0 = 0, t1;

	if (iters < 1)
		iters = 1;
	warmup = arg("warmup", iters / 10);
	if (warmup > iters - 1)
		warmup = iters - 1;
	crc_init();
	log_str("c-boot-cpl3: own boot, own page tables, ring-buffered console\n");
	hashing = 1;
	for (unsigned long i = 0; i < iters; i++) {
		uint64_t key = i * 0x9e3779b97f4a7c15ull;

		if (i == warmup) {
			outl(MARKER, 1);
			t0 = rdtsc();
		}
		log_str("seq ");
		log_num(i, 10, 6, '0');
		log_str(" crc ");
		log_num(crc32(&key, sizeof(key)), 16, 8, '0');
		log_str(" len ");
		log_num(key % 37, 10, 2, ' ');
		log_char('\n');
	}
	t1 = rdtsc();
	outl(MARKER, 2);
	hashing = 0;
	log_str("RESULT workload=c-boot-cpl3 iters=");
	log_num(iters, 10, 0, ' ');
	log_str(" warmup=");
	log_num(warmup, 10, 0, ' ');
	log_str(" cycles_per_iter=");
	log_num((t1 - t0) / (iters - warmup), 10, 0, ' ');
	log_str(" checksum=0x");
	log_num(out_hash, 16, 8, '0');
	log_char('\n');
	outb(DEBUG_EXIT, tx_timeouts ? 5 : 0);
	for (;;)
		__asm__ __volatile__("pause");
}

/* lib.h - the small C runtime the C guests share: strings, a printf-style
 * formatter, consoles and printk, the command line, the benchmark protocol
 * and exit. Everything here runs at CPL3. */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

#include "types.h"

/* string.c */
void *memset(void *s, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);

/* vsprintf.c: %[-0][width][hh|h|l|ll|z](d|i|u|x|X|c|s|p|%) */
int vsnprintf(char *buf, size_t size, const char *fmt, va_list args);
int snprintf(char *buf, size_t size, const char *fmt, ...) __printf(3, 4);
unsigned long simple_strtoul(const char *s, const char **end);

/* console.c: registered consoles receive everything printk formats. */
struct console {
	const char *name;
	void (*write)(struct console *con, const char *s, unsigned int count);
	void *data;
	struct console *next;
};
void register_console(struct console *con);
void console_write(const char *s, unsigned int count);
int printk(const char *fmt, ...) __printf(1, 2);

/* cmdline.c: `key=value` words of the boot command line. */
const char *cmdline_find(const char *cmdline, const char *key);
unsigned long cmdline_ulong(const char *cmdline, const char *key, unsigned long def);

/* bench.c: the protocol of the workload guests (Guests/README.md). */
struct bench {
	const char *name;
	unsigned long iters;
	unsigned long warmup;
	u64 tsc_start;
	u64 tsc_end;
};
void bench_init(struct bench *b, const char *name, const char *cmdline, unsigned long default_iters);
void bench_mark_start(struct bench *b);
void bench_mark_end(struct bench *b);
void bench_report(const struct bench *b, u32 checksum);

#define FNV_OFFSET 0x811c9dc5u
#define FNV_PRIME 0x01000193u
u32 fnv1a(u32 hash, const void *data, size_t len);

/* crt.c */
int main(const char *cmdline);
void exit(int status) __noreturn;
void panic(const char *fmt, ...) __printf(1, 2) __noreturn;

#endif

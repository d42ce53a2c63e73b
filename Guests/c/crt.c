/* crt.c - the C runtime's entry (called at CPL3 by start.s), exit through
 * the debug-exit port (QEMU's isa-debug-exit, minivmm's debug-exit device)
 * and panic. */
#include "lib.h"
#include "io.h"

#define DEBUG_EXIT_PORT 0xf4

void c_start(const char *cmdline) __noreturn;

void c_start(const char *cmdline)
{
	exit(main(cmdline));
}

void exit(int status)
{
	outb(status, DEBUG_EXIT_PORT);
	for (;;)
		cpu_relax();
}

void panic(const char *fmt, ...)
{
	char buf[128];
	va_list args;
	int n;

	va_start(args, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, args);
	va_end(args);
	console_write("panic: ", 7);
	console_write(buf, n < (int)sizeof(buf) ? n : (int)sizeof(buf) - 1);
	console_write("\n", 1);
	exit(3);
}

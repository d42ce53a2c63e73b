/* console.c - a list of registered consoles and printk. */
#include "lib.h"

static struct console *console_list;

void register_console(struct console *con)
{
	struct console **p = &console_list;

	while (*p)
		p = &(*p)->next;
	con->next = NULL;
	*p = con;
}

void console_write(const char *s, unsigned int count)
{
	struct console *con;

	for (con = console_list; con; con = con->next)
		con->write(con, s, count);
}

int printk(const char *fmt, ...)
{
	static char printk_buf[256];
	va_list args;
	int n;

	va_start(args, fmt);
	n = vsnprintf(printk_buf, sizeof(printk_buf), fmt, args);
	va_end(args);
	if (n > (int)sizeof(printk_buf) - 1)
		n = sizeof(printk_buf) - 1;
	console_write(printk_buf, n);
	return n;
}

/* serial_core.c - the serial core's console helper: one putchar call per
 * byte, through the driver's function. */
#include "serial.h"

void uart_console_write(struct uart_port *port, const char *s, unsigned int count,
			void (*putchar)(struct uart_port *, unsigned char))
{
	unsigned int i;

	for (i = 0; i < count; i++, s++)
		putchar(port, *s);
}

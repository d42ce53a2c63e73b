/* serial.h - an 8250/16550 polling driver in the shape of Linux's: a port
 * with register accessors chosen by its I/O type, reached through function
 * pointers, and a console on top. */
#ifndef GUEST_SERIAL_H
#define GUEST_SERIAL_H

#include "lib.h"

#define UART_TX 0 /* out: transmit holding register */
#define UART_IER 1 /* interrupt enable */
#define UART_FCR 2 /* out: FIFO control */
#define UART_LCR 3 /* line control */
#define UART_MCR 4 /* modem control */
#define UART_LSR 5 /* in: line status */
#define UART_DLL 0 /* divisor latch, low (DLAB set) */
#define UART_DLM 1 /* divisor latch, high (DLAB set) */

#define UART_LCR_DLAB 0x80
#define UART_LCR_WLEN8 0x03
#define UART_MCR_DTR 0x01
#define UART_MCR_RTS 0x02
#define UART_LSR_THRE 0x20
#define UART_LSR_TEMT 0x40

enum upio {
	UPIO_PORT, /* plain port I/O */
	UPIO_PORT_SLOW, /* port I/O with an ISA recovery delay after each access */
};

struct uart_port {
	unsigned long iobase;
	unsigned int uartclk;
	enum upio iotype;
	unsigned int (*serial_in)(struct uart_port *port, int offset);
	void (*serial_out)(struct uart_port *port, int offset, int value);
	unsigned long tx_chars;
	unsigned long tx_timeouts;
};

void serial8250_init_port(struct uart_port *port, unsigned long iobase, unsigned int baud, enum upio iotype);
void serial8250_console_putchar(struct uart_port *port, unsigned char ch);
void serial8250_console_write(struct console *con, const char *s, unsigned int count);

/* serial_core.c */
void uart_console_write(struct uart_port *port, const char *s, unsigned int count,
			void (*putchar)(struct uart_port *, unsigned char));

#endif

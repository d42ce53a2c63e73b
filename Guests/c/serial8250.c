/* serial8250.c - the 8250 polling driver: wait for the transmit holding
 * register to empty (LSR.THRE), then write it. */
#include "serial.h"
#include "io.h"

static unsigned int io_serial_in(struct uart_port *p, int offset)
{
	return inb(p->iobase + offset);
}

static void io_serial_out(struct uart_port *p, int offset, int value)
{
	outb(value, p->iobase + offset);
}

static unsigned int io_serial_in_slow(struct uart_port *p, int offset)
{
	return inb_p(p->iobase + offset);
}

static void io_serial_out_slow(struct uart_port *p, int offset, int value)
{
	outb_p(value, p->iobase + offset);
}

static void set_io_from_upio(struct uart_port *p)
{
	switch (p->iotype) {
	case UPIO_PORT_SLOW:
		p->serial_in = io_serial_in_slow;
		p->serial_out = io_serial_out_slow;
		break;
	default:
		p->serial_in = io_serial_in;
		p->serial_out = io_serial_out;
		break;
	}
}

static inline unsigned int serial_in(struct uart_port *p, int offset)
{
	return p->serial_in(p, offset);
}

static inline void serial_out(struct uart_port *p, int offset, int value)
{
	p->serial_out(p, offset, value);
}

void serial8250_init_port(struct uart_port *port, unsigned long iobase, unsigned int baud, enum upio iotype)
{
	unsigned int divisor;
	unsigned char c;

	port->iobase = iobase;
	port->uartclk = 1843200;
	port->iotype = iotype;
	port->tx_chars = 0;
	port->tx_timeouts = 0;
	set_io_from_upio(port);

	divisor = port->uartclk / 16 / baud;
	serial_out(port, UART_LCR, UART_LCR_WLEN8); /* 8n1 */
	serial_out(port, UART_IER, 0); /* no interrupts */
	serial_out(port, UART_FCR, 0); /* no FIFO */
	serial_out(port, UART_MCR, UART_MCR_DTR | UART_MCR_RTS);
	c = serial_in(port, UART_LCR);
	serial_out(port, UART_LCR, c | UART_LCR_DLAB);
	serial_out(port, UART_DLL, divisor & 0xff);
	serial_out(port, UART_DLM, (divisor >> 8) & 0xff);
	serial_out(port, UART_LCR, c & ~UART_LCR_DLAB);
}

/* Wait (bounded) until every bit of `bits` is set in the line status. */
static void wait_for_xmitr(struct uart_port *port, unsigned int bits)
{
	unsigned int status, tmout = 10000;

	for (;;) {
		status = serial_in(port, UART_LSR);
		if ((status & bits) == bits)
			break;
		if (--tmout == 0) {
			port->tx_timeouts++;
			break;
		}
		cpu_relax();
	}
}

void serial8250_console_putchar(struct uart_port *port, unsigned char ch)
{
	wait_for_xmitr(port, UART_LSR_THRE);
	serial_out(port, UART_TX, ch);
	port->tx_chars++;
}

void serial8250_console_write(struct console *con, const char *s, unsigned int count)
{
	struct uart_port *port = con->data;

	uart_console_write(port, s, count, serial8250_console_putchar);
}

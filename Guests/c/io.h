/* io.h - port I/O, the TSC and cpu_relax, the way a kernel's <asm/io.h>
 * spells them: static inline functions with inline asm. The "Nd" constraint
 * lets gcc use the imm8 form (in al, 0x80) for constant ports below 0x100
 * and the DX form otherwise. */
#ifndef GUEST_IO_H
#define GUEST_IO_H

#include "types.h"

static inline void outb(u8 value, u16 port)
{
	asm volatile("outb %b0, %w1" : : "a"(value), "Nd"(port));
}

static inline void outw(u16 value, u16 port)
{
	asm volatile("outw %w0, %w1" : : "a"(value), "Nd"(port));
}

static inline void outl(u32 value, u16 port)
{
	asm volatile("outl %0, %w1" : : "a"(value), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 value;
	asm volatile("inb %w1, %b0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline u16 inw(u16 port)
{
	u16 value;
	asm volatile("inw %w1, %w0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline u32 inl(u16 port)
{
	u32 value;
	asm volatile("inl %w1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

/* The classic ISA delay: a write to the POST-code port 0x80. */
static inline void io_delay(void)
{
	const u16 DELAY_PORT = 0x80;
	outb(0, DELAY_PORT);
}

static inline void outb_p(u8 value, u16 port)
{
	outb(value, port);
	io_delay();
}

static inline u8 inb_p(u16 port)
{
	u8 value = inb(port);
	io_delay();
	return value;
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
	asm volatile("rep; nop" : : : "memory");
}

static inline void barrier(void)
{
	asm volatile("" : : : "memory");
}

#endif

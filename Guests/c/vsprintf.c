/* vsprintf.c - a printf-style formatter in the spirit of the kernel's:
 * flags '-' and '0', a field width, length modifiers hh, h, l, ll, z, and
 * the conversions d i u x X c s p %. Output is truncated to the buffer and
 * always NUL-terminated; the return value is the length that would have
 * been written. */
#include "lib.h"

#define ZEROPAD 1
#define LEFT 2
#define SIGN 4
#define UPPER 8

struct outbuf {
	char *buf;
	size_t size;
	size_t pos;
};

static void put(struct outbuf *o, char c)
{
	if (o->pos + 1 < o->size)
		o->buf[o->pos] = c;
	o->pos++;
}

static void number(struct outbuf *o, unsigned long long num, int base, int width, int flags)
{
	static const char digits[] = "0123456789abcdef0123456789ABCDEF";
	const char *dig = digits + ((flags & UPPER) ? 16 : 0);
	char tmp[24];
	int i = 0;
	char sign = 0;

	if ((flags & SIGN) && (long long)num < 0) {
		sign = '-';
		num = -(long long)num;
		width--;
	}
	do {
		tmp[i++] = dig[num % base];
		num /= base;
	} while (num);
	width -= i;
	if (!(flags & (LEFT | ZEROPAD)))
		while (width-- > 0)
			put(o, ' ');
	if (sign)
		put(o, sign);
	if (!(flags & LEFT) && (flags & ZEROPAD))
		while (width-- > 0)
			put(o, '0');
	while (i > 0)
		put(o, tmp[--i]);
	while (width-- > 0)
		put(o, ' ');
}

static void string(struct outbuf *o, const char *s, int width, int flags)
{
	int len;

	if (!s)
		s = "(null)";
	len = strlen(s);
	if (!(flags & LEFT))
		while (len < width--)
			put(o, ' ');
	while (*s)
		put(o, *s++);
	while (len < width--)
		put(o, ' ');
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list args)
{
	struct outbuf o = { buf, size, 0 };

	for (; *fmt; fmt++) {
		int flags = 0, width = 0, qual = 0, base = 10;
		unsigned long long num;

		if (*fmt != '%') {
			put(&o, *fmt);
			continue;
		}
		for (;;) {
			fmt++;
			if (*fmt == '-')
				flags |= LEFT;
			else if (*fmt == '0')
				flags |= ZEROPAD;
			else
				break;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		if (*fmt == 'h') {
			qual = 'h';
			if (*++fmt == 'h') {
				qual = 'H';
				fmt++;
			}
		} else if (*fmt == 'l') {
			qual = 'l';
			if (*++fmt == 'l') {
				qual = 'L';
				fmt++;
			}
		} else if (*fmt == 'z') {
			qual = 'z';
			fmt++;
		}
		switch (*fmt) {
		case 'c':
			if (!(flags & LEFT))
				while (--width > 0)
					put(&o, ' ');
			put(&o, (char)va_arg(args, int));
			while (--width > 0)
				put(&o, ' ');
			continue;
		case 's':
			string(&o, va_arg(args, const char *), width, flags);
			continue;
		case 'p':
			put(&o, '0');
			put(&o, 'x');
			number(&o, (unsigned long)va_arg(args, void *), 16, 16, ZEROPAD);
			continue;
		case '%':
			put(&o, '%');
			continue;
		case 'd':
		case 'i':
			flags |= SIGN;
			break;
		case 'u':
			break;
		case 'X':
			flags |= UPPER;
			/* fall through */
		case 'x':
			base = 16;
			break;
		default:
			put(&o, '%');
			if (!*fmt)
				fmt--;
			else
				put(&o, *fmt);
			continue;
		}
		if (qual == 'L')
			num = va_arg(args, unsigned long long);
		else if (qual == 'l' || qual == 'z')
			num = va_arg(args, unsigned long);
		else
			num = va_arg(args, unsigned int);
		if (flags & SIGN) {
			if (qual == 'H')
				num = (signed char)num;
			else if (qual == 'h')
				num = (short)num;
			else if (qual == 0)
				num = (int)num;
		} else if (qual == 'H') {
			num = (unsigned char)num;
		} else if (qual == 'h') {
			num = (unsigned short)num;
		}
		number(&o, num, base, width, flags);
	}
	if (size)
		buf[o.pos < size ? o.pos : size - 1] = '\0';
	return o.pos;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list args;
	int n;

	va_start(args, fmt);
	n = vsnprintf(buf, size, fmt, args);
	va_end(args);
	return n;
}

/* Decimal, or hexadecimal after 0x; stops at the first other byte. */
unsigned long simple_strtoul(const char *s, const char **end)
{
	unsigned long v = 0;

	if (s[0] == '0' && (s[1] | 0x20) == 'x') {
		for (s += 2;; s++) {
			unsigned c = (unsigned char)*s, d;

			if (c - '0' <= 9)
				d = c - '0';
			else if ((c | 0x20) - 'a' <= 5)
				d = (c | 0x20) - 'a' + 10;
			else
				break;
			v = v * 16 + d;
		}
	} else {
		for (; (unsigned)(*s - '0') <= 9; s++)
			v = v * 10 + (*s - '0');
	}
	if (end)
		*end = s;
	return v;
}

/* c-printf-cpl3 - an embedded printf library in the style of mpaland/printf,
 * written from memory by someone who did not write DMP and not shaped for it,
 * with a runtime of its own (only c/start.s's boot path, which calls c_start
 * at CPL3): an output function pointer (out_fct_type) handed down to
 * _vsnprintf (one big loop with a flags/width/precision parser and a switch on
 * the specifier), _ntoa_long/_ntoa_format filling a buffer backwards and
 * _out_rev writing it reversed with padding, _out_char calling the
 * application's _putchar, _out_buffer for snprintf_, fctprintf with a user
 * callback (sink_out: reached only through _out_fct's tail jump through the
 * callback pointer). _putchar and sink_out do the port I/O (poll LSR, write
 * THR), inlined.
 * Command line: iters=N (300) warmup=W (N/10).
 * RESULT checksum: FNV-1a 32 over every byte written to the THR before it. */
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);

void *memset(void *dst, int c, size_t n)
{ unsigned char *d = dst; while (n--) *d++ = (unsigned char)c; return dst; }
void *memcpy(void *dst, const void *src, size_t n)
{ unsigned char *d = dst; const unsigned char *s = src; while (n--) *d++ = *s++; return dst; }

static inline u64 rt_tsc(void)
{ u32 lo, hi; __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }

static inline void rt_marker(u32 v)
{ __asm__ __volatile__("outl %0, %w1" : : "a"(v), "Nd"((u16)0x700)); }

static unsigned long rt_arg(const char *cmdline, const char *key, unsigned long def)
{
	const char *p = cmdline;
	while (p && *p) {
		const char *k = key, *q = p; unsigned long v = 0; int digits = 0;
		while (*k && *q == *k) { k++; q++; }
		if (!*k && *q == '=' && (p == cmdline || p[-1] == ' ')) {
			for (q++; *q >= '0' && *q <= '9'; q++, digits++) v = v * 10 + (unsigned long)(*q - '0');
			return digits ? v : def;
		}
		p++;
	}
	return def;
}

static inline u32 rt_fnv(u32 h, u8 c) { return (h ^ c) * 0x01000193u; }

#define PRINTF_NTOA_BUFFER_SIZE 32U
#define FLAGS_ZEROPAD (1U << 0U)
#define FLAGS_LEFT (1U << 1U)
#define FLAGS_PLUS (1U << 2U)
#define FLAGS_SPACE (1U << 3U)
#define FLAGS_HASH (1U << 4U)
#define FLAGS_UPPERCASE (1U << 5U)
#define FLAGS_CHAR (1U << 6U)
#define FLAGS_SHORT (1U << 7U)
#define FLAGS_LONG (1U << 8U)
#define FLAGS_LONG_LONG (1U << 9U)
#define FLAGS_PRECISION (1U << 10U)

/* ---- the application's side ---- */
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }

#define UART_BASE 0x3f8
static u32 tx_hash = 0x811c9dc5u;

void _putchar(char character)
{
	while ((inb(UART_BASE + 5) & 0x20) == 0)
		;
	outb(UART_BASE, (u8)character);
	tx_hash = rt_fnv(tx_hash, (u8)character);
}

/* ---- the library ---- */
typedef void (*out_fct_type)(char character, void *buffer, size_t idx, size_t maxlen);

typedef struct {
	void (*fct)(char character, void *arg);
	void *arg;
} out_fct_wrap_type;

static inline void _out_buffer(char character, void *buffer, size_t idx, size_t maxlen)
{
	if (idx < maxlen)
		((char *)buffer)[idx] = character;
}

static inline void _out_null(char character, void *buffer, size_t idx, size_t maxlen)
{
	(void)character; (void)buffer; (void)idx; (void)maxlen;
}

static inline void _out_char(char character, void *buffer, size_t idx, size_t maxlen)
{
	(void)buffer; (void)idx; (void)maxlen;
	if (character)
		_putchar(character);
}

static inline void _out_fct(char character, void *buffer, size_t idx, size_t maxlen)
{
	(void)idx; (void)maxlen;
	if (character)
		((out_fct_wrap_type *)buffer)->fct(character, ((out_fct_wrap_type *)buffer)->arg);
}

static inline unsigned int _strnlen_s(const char *str, size_t maxsize)
{
	const char *s;
	for (s = str; *s && maxsize--; ++s)
		;
	return (unsigned int)(s - str);
}

static inline bool _is_digit(char ch) { return (ch >= '0') && (ch <= '9'); }

static unsigned int _atoi(const char **str)
{
	unsigned int i = 0U;
	while (_is_digit(**str))
		i = i * 10U + (unsigned int)(*((*str)++) - '0');
	return i;
}

static size_t _out_rev(out_fct_type out, char *buffer, size_t idx, size_t maxlen, const char *buf, size_t len,
		       unsigned int width, unsigned int flags)
{
	const size_t start_idx = idx;

	if (!(flags & FLAGS_LEFT) && !(flags & FLAGS_ZEROPAD)) {
		for (size_t i = len; i < width; i++)
			out(' ', buffer, idx++, maxlen);
	}
	while (len)
		out(buf[--len], buffer, idx++, maxlen);
	if (flags & FLAGS_LEFT) {
		while (idx - start_idx < width)
			out(' ', buffer, idx++, maxlen);
	}
	return idx;
}

static size_t _ntoa_format(out_fct_type out, char *buffer, size_t idx, size_t maxlen, char *buf, size_t len, bool negative,
			   unsigned int base, unsigned int prec, unsigned int width, unsigned int flags)
{
	if (!(flags & FLAGS_LEFT)) {
		if (width && (flags & FLAGS_ZEROPAD) && (negative || (flags & (FLAGS_PLUS | FLAGS_SPACE))))
			width--;
		while ((len < prec) && (len < PRINTF_NTOA_BUFFER_SIZE))
			buf[len++] = '0';
		while ((flags & FLAGS_ZEROPAD) && (len < width) && (len < PRINTF_NTOA_BUFFER_SIZE))
			buf[len++] = '0';
	}
	if (flags & FLAGS_HASH) {
		if (!(flags & FLAGS_PRECISION) && len && ((len == prec) || (len == width))) {
			len--;
			if (len && (base == 16U))
				len--;
		}
		if ((base == 16U) && !(flags & FLAGS_UPPERCASE) && (len < PRINTF_NTOA_BUFFER_SIZE))
			buf[len++] = 'x';
		else if ((base == 16U) && (flags & FLAGS_UPPERCASE) && (len < PRINTF_NTOA_BUFFER_SIZE))
			buf[len++] = 'X';
		if (len < PRINTF_NTOA_BUFFER_SIZE)
			buf[len++] = '0';
	}
	if (len < PRINTF_NTOA_BUFFER_SIZE) {
		if (negative)
			buf[len++] = '-';
		else if (flags & FLAGS_PLUS)
			buf[len++] = '+';
		else if (flags & FLAGS_SPACE)
			buf[len++] = ' ';
	}
	return _out_rev(out, buffer, idx, maxlen, buf, len, width, flags);
}

static size_t _ntoa_long(out_fct_type out, char *buffer, size_t idx, size_t maxlen, unsigned long value, bool negative,
			 unsigned long base, unsigned int prec, unsigned int width, unsigned int flags)
{
	char buf[PRINTF_NTOA_BUFFER_SIZE];
	size_t len = 0U;

	if (!value)
		flags &= ~FLAGS_HASH;
	if (!(flags & FLAGS_PRECISION) || value) {
		do {
			const char digit = (char)(value % base);
			buf[len++] = digit < 10 ? '0' + digit : (flags & FLAGS_UPPERCASE ? 'A' : 'a') + digit - 10;
			value /= base;
		} while (value && (len < PRINTF_NTOA_BUFFER_SIZE));
	}
	return _ntoa_format(out, buffer, idx, maxlen, buf, len, negative, (unsigned int)base, prec, width, flags);
}

static int _vsnprintf(out_fct_type out, char *buffer, const size_t maxlen, const char *format, va_list va)
{
	unsigned int flags, width, precision, n;
	size_t idx = 0U;

	if (!buffer)
		out = _out_null;

	while (*format) {
		if (*format != '%') {
			out(*format, buffer, idx++, maxlen);
			format++;
			continue;
		} else {
			format++;
		}
		flags = 0U;
		do {
			switch (*format) {
			case '0': flags |= FLAGS_ZEROPAD; format++; n = 1U; break;
			case '-': flags |= FLAGS_LEFT; format++; n = 1U; break;
			case '+': flags |= FLAGS_PLUS; format++; n = 1U; break;
			case ' ': flags |= FLAGS_SPACE; format++; n = 1U; break;
			case '#': flags |= FLAGS_HASH; format++; n = 1U; break;
			default: n = 0U; break;
			}
		} while (n);
		width = 0U;
		if (_is_digit(*format)) {
			width = _atoi(&format);
		} else if (*format == '*') {
			const int w = va_arg(va, int);
			if (w < 0) {
				flags |= FLAGS_LEFT;
				width = (unsigned int)-w;
			} else {
				width = (unsigned int)w;
			}
			format++;
		}
		precision = 0U;
		if (*format == '.') {
			flags |= FLAGS_PRECISION;
			format++;
			if (_is_digit(*format)) {
				precision = _atoi(&format);
			} else if (*format == '*') {
				const int prec = (int)va_arg(va, int);
				precision = prec > 0 ? (unsigned int)prec : 0U;
				format++;
			}
		}
		switch (*format) {
		case 'l':
			flags |= FLAGS_LONG;
			format++;
			if (*format == 'l') {
				flags |= FLAGS_LONG_LONG;
				format++;
			}
			break;
		case 'h':
			flags |= FLAGS_SHORT;
			format++;
			if (*format == 'h') {
				flags |= FLAGS_CHAR;
				format++;
			}
			break;
		case 'z':
			flags |= (sizeof(size_t) == sizeof(long) ? FLAGS_LONG : FLAGS_LONG_LONG);
			format++;
			break;
		default:
			break;
		}
		switch (*format) {
		case 'd':
		case 'i':
		case 'u':
		case 'x':
		case 'X':
		case 'o':
		case 'b': {
			unsigned int base;
			if (*format == 'x' || *format == 'X')
				base = 16U;
			else if (*format == 'o')
				base = 8U;
			else if (*format == 'b')
				base = 2U;
			else {
				base = 10U;
				flags &= ~FLAGS_HASH;
			}
			if (*format == 'X')
				flags |= FLAGS_UPPERCASE;
			if ((*format != 'i') && (*format != 'd'))
				flags &= ~(FLAGS_PLUS | FLAGS_SPACE);
			if (flags & FLAGS_PRECISION)
				flags &= ~FLAGS_ZEROPAD;
			if ((*format == 'i') || (*format == 'd')) {
				if (flags & FLAGS_LONG) {
					const long value = va_arg(va, long);
					idx = _ntoa_long(out, buffer, idx, maxlen, (unsigned long)(value > 0 ? value : 0 - value),
							 value < 0, base, precision, width, flags);
				} else {
					const int value = (flags & FLAGS_CHAR) ? (char)va_arg(va, int)
							  : (flags & FLAGS_SHORT) ? (short int)va_arg(va, int) : va_arg(va, int);
					idx = _ntoa_long(out, buffer, idx, maxlen, (unsigned int)(value > 0 ? value : 0 - value),
							 value < 0, base, precision, width, flags);
				}
			} else {
				if (flags & FLAGS_LONG) {
					idx = _ntoa_long(out, buffer, idx, maxlen, va_arg(va, unsigned long), false, base, precision,
							 width, flags);
				} else {
					const unsigned int value = (flags & FLAGS_CHAR) ? (unsigned char)va_arg(va, unsigned int)
								   : (flags & FLAGS_SHORT) ? (unsigned short int)va_arg(va, unsigned int)
								   : va_arg(va, unsigned int);
					idx = _ntoa_long(out, buffer, idx, maxlen, value, false, base, precision, width, flags);
				}
			}
			format++;
			break;
		}
		case 'c': {
			unsigned int l = 1U;
			if (!(flags & FLAGS_LEFT)) {
				while (l++ < width)
					out(' ', buffer, idx++, maxlen);
			}
			out((char)va_arg(va, int), buffer, idx++, maxlen);
			if (flags & FLAGS_LEFT) {
				while (l++ < width)
					out(' ', buffer, idx++, maxlen);
			}
			format++;
			break;
		}
		case 's': {
			const char *p = va_arg(va, char *);
			unsigned int l = _strnlen_s(p, precision ? precision : (size_t)-1);
			if (flags & FLAGS_PRECISION)
				l = (l < precision ? l : precision);
			if (!(flags & FLAGS_LEFT)) {
				while (l++ < width)
					out(' ', buffer, idx++, maxlen);
			}
			while ((*p != 0) && (!(flags & FLAGS_PRECISION) || precision--))
				out(*(p++), buffer, idx++, maxlen);
			if (flags & FLAGS_LEFT) {
				while (l++ < width)
					out(' ', buffer, idx++, maxlen);
			}
			format++;
			break;
		}
		case 'p': {
			width = sizeof(void *) * 2U;
			flags |= FLAGS_ZEROPAD | FLAGS_UPPERCASE;
			idx = _ntoa_long(out, buffer, idx, maxlen, (unsigned long)((uintptr_t)va_arg(va, void *)), false, 16U,
					 precision, width, flags);
			format++;
			break;
		}
		case '%':
			out('%', buffer, idx++, maxlen);
			format++;
			break;
		default:
			out(*format, buffer, idx++, maxlen);
			format++;
			break;
		}
	}
	out((char)0, buffer, idx < maxlen ? idx : maxlen - 1U, maxlen);
	return (int)idx;
}

int printf_(const char *format, ...)
{
	va_list va;
	va_start(va, format);
	char buffer[1];
	const int ret = _vsnprintf(_out_char, buffer, (size_t)-1, format, va);
	va_end(va);
	return ret;
}

int snprintf_(char *buffer, size_t count, const char *format, ...)
{
	va_list va;
	va_start(va, format);
	const int ret = _vsnprintf(_out_buffer, buffer, count, format, va);
	va_end(va);
	return ret;
}

int fctprintf(void (*out)(char character, void *arg), void *arg, const char *format, ...)
{
	va_list va;
	va_start(va, format);
	const out_fct_wrap_type out_fct_wrap = { out, arg };
	const int ret = _vsnprintf(_out_fct, (char *)(uintptr_t)&out_fct_wrap, (size_t)-1, format, va);
	va_end(va);
	return ret;
}

/* ---- the application ---- */
int main(const char *cmdline);
struct log_sink { unsigned count; u32 hash; };

static void sink_out(char c, void *arg)
{
	struct log_sink *s = arg;
	s->count++;
	s->hash = rt_fnv(s->hash, (u8)c);
	_putchar(c);
}

int main(const char *cmdline)
{
	unsigned long iters, warmup, i;
	u64 t0 = 0, t1;
	struct log_sink sink = { 0, 0x811c9dc5u };
	char tag[24];

	iters = rt_arg(cmdline, "iters", 300);
	if (iters < 1)
		iters = 1;
	warmup = rt_arg(cmdline, "warmup", iters / 10);
	if (warmup > iters - 1)
		warmup = iters - 1;
	printf_("printf test %s %d %5.2s|\r\n", "start", -42, "abc");
	for (i = 0; i < iters; i++) {
		if (i == warmup) {
			rt_marker(1);
			t0 = rt_tsc();
		}
		snprintf_(tag, sizeof(tag), "node-%03u", (unsigned)(i % 97));
		printf_("%-10s seq=%6lu temp=%+d.%u C volt=%#06x ", tag, i, (int)(i % 40) - 10, (unsigned)(i % 10),
			(unsigned)(3300 + i % 50));
		fctprintf(sink_out, &sink, "crc=%08lX flags=%b\r\n", (unsigned long)(i * 2654435761u) & 0xffffffffUL,
			  (unsigned)(i & 0x1f));
	}
	t1 = rt_tsc();
	rt_marker(2);
	printf_("sink %u bytes hash %08x\r\n", sink.count, sink.hash);
	printf_("RESULT workload=c-printf-cpl3 iters=%lu warmup=%lu cycles_per_iter=%lu checksum=0x%08x\n", iters, warmup,
		(unsigned long)((t1 - t0) / (iters - warmup)), tx_hash);
	return 0;
}

__attribute__((noreturn)) void c_start(const char *cmdline);

void c_start(const char *cmdline)
{
	__asm__ __volatile__("outb %b0, $0xf4" : : "a"((u8)main(cmdline)));
	for (;;)
		__asm__ __volatile__("pause");
}

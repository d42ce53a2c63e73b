/* cmdline.c - `key=value` words of the boot command line, separated by
 * spaces (any byte 1..32). */
#include "lib.h"

const char *cmdline_find(const char *cmdline, const char *key)
{
	size_t len = strlen(key);
	const char *p = cmdline;

	if (!p)
		return NULL;
	while (*p) {
		while (*p && (unsigned char)*p <= ' ')
			p++;
		if (!*p)
			break;
		if (!strncmp(p, key, len) && p[len] == '=')
			return p + len + 1;
		while ((unsigned char)*p > ' ')
			p++;
	}
	return NULL;
}

unsigned long cmdline_ulong(const char *cmdline, const char *key, unsigned long def)
{
	const char *v = cmdline_find(cmdline, key);

	return v ? simple_strtoul(v, NULL) : def;
}

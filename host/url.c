/* Broker URLs with whatever could be a password masked, however malformed
 * the URL: for log lines, error messages and show-config. No Lua here, so
 * that link.c can use it. */
#include "url.h"

#include <string.h>

typedef struct {
    char *p;
    size_t left; /* room for bytes, the terminating NUL not counted */
} sink;

static void put(sink *o, const char *s, size_t n) {
    if (n > o->left) n = o->left;
    memcpy(o->p, s, n);
    o->p += n;
    o->left -= n;
    *o->p = '\0';
}

/* Up to 5 digits to the end or a '/': a port, not a password. */
static int port_text(const char *s, size_t n) {
    size_t i = 0;
    long port = 0;
    for (; i < n && s[i] != '/'; i++) {
        if (s[i] < '0' || s[i] > '9' || i == 5) return 0;
        port = port * 10 + (s[i] - '0');
    }
    return port <= 65535;
}

/* One URL. Whatever could be a password goes: all before the last '@' but
 * the user name (so an unencoded '@' in the password does not leak its
 * tail), and after a ':' that does not start a port when there is no '@' at
 * all ("amqp://user:S3cret" is malformed, and still a password). */
static void mask_one(sink *o, const char *w, size_t n) {
    const char *scheme_end = NULL;
    for (size_t i = 0; i + 3 <= n; i++)
        if (!memcmp(w + i, "://", 3)) {
            scheme_end = w + i + 3;
            break;
        }
    const char *rest = scheme_end ? scheme_end : w, *end = w + n;
    put(o, w, (size_t)(rest - w));
    const char *at = NULL;
    for (const char *p = rest; p < end; p++)
        if (*p == '@') at = p;
    if (at) {
        const char *colon = memchr(rest, ':', (size_t)(at - rest));
        if (!scheme_end) { /* a word of a URL split at a space: no user to show */
            put(o, "****", 4);
        } else if (colon) {
            put(o, rest, (size_t)(colon - rest));
            put(o, ":****", 5);
        } else {
            put(o, rest, (size_t)(at - rest));
        }
        put(o, at, (size_t)(end - at));
        return;
    }
    const char *host = rest;
    if (host < end && *host == '[') { /* an IPv6 literal holds colons of its own */
        const char *close = memchr(host, ']', (size_t)(end - host));
        if (close) host = close;
    }
    const char *colon = memchr(host, ':', (size_t)(end - host));
    if (colon && !port_text(colon + 1, (size_t)(end - colon - 1))) {
        put(o, rest, (size_t)(colon + 1 - rest));
        put(o, "****", 4);
        return;
    }
    put(o, rest, (size_t)(end - rest));
}

/* A URL list, its URLs separated by spaces, masked into out (truncated to
 * outlen - 1 bytes): each URL grows by 4 bytes at most. */
void rb_mask_url(const char *url, char *out, size_t outlen) {
    if (outlen == 0) return;
    sink o = {out, outlen - 1};
    *out = '\0';
    const char *p = url;
    while (*p) {
        size_t spaces = strspn(p, " ");
        put(&o, p, spaces);
        p += spaces;
        size_t n = strcspn(p, " ");
        if (n) mask_one(&o, p, n);
        p += n;
    }
}

/* JSON for Lua values, as Python's json module (RabiBridge's json
 * serialiser) writes and reads it: requests are [args, kwargs], replies
 * [err_code, result].
 *
 * lua-cjson as Debian ships it (2.1.0) has no array metatable, so [] and {}
 * both decode to an empty table and both re-encode as {}: empty args would
 * come back as an object. Here decoded arrays carry the array metatable
 * (the registry's "rabibridge.array_mt", shared with msgpack.c) and tables
 * carrying it always encode as arrays; null is a NULL lightuserdata, the
 * same value as cjson.null.
 *
 * Python's side decides the rest. Integers beyond 2^53 decode to int64_t or
 * uint64_t cdata and integer cdata encode as integers; integral numbers up
 * to 2^63 are written as integers (a float to Python only if it has a
 * fraction), -0.0 as -0.0; NaN, Infinity and -Infinity are read and
 * written. Strings must be UTF-8: JSON carries text, and a Python peer
 * drops a body that is not. Surrogate code points, which Python writes as
 * lone \ud800 escapes, decode to their three bytes (WTF-8) and encode back
 * to the same escape, so they survive a round trip.
 *
 * Bad values and bad input come back as nil, message; only running out of
 * memory raises. The encoder writes into a buffer owned by a userdata, so a
 * raised error cannot leak it, and the decoder keeps nothing outside the Lua
 * stack. Both stop at a nesting depth of 1000, which bounds their recursion
 * and the Lua stack they use. */
#include <limits.h>
#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "lauxlib.h"
#include "values.h"

/* The API functions are closures over these. */
#define BUF_UPV lua_upvalueindex(1)
#define ARRAY_MT_UPV lua_upvalueindex(2)

/* strtod_l with this ignores a process-wide setlocale(LC_NUMERIC). Made
 * once for the process and never freed: every Lua state of it shares it. */
static locale_t c_locale;

static locale_t the_c_locale(void) {
    if (!c_locale) c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    return c_locale;
}

/* A finite non-integer: %.15g when that reads back as the same double, so
 * 0.1 stays "0.1" rather than 0.10000000000000001; otherwise %.17g, which
 * always does. (Trying %.16g in between costs more than it saves.) */
static size_t format_double(char *out, size_t size, double d, locale_t loc) {
    size_t n = rb_format_g(out, size, 15, d);
    if (strtod_l(out, NULL, loc) == d) return n;
    return rb_format_g(out, size, 17, d);
}

/* ---- encoding ---- */

typedef struct {
    lua_State *L;
    rb_outbuf *b;
    locale_t c_locale;
    int array_mt; /* the stack index of the array metatable */
    int nomem;
    char message[160];
    rb_path path; /* where the failure is, e.g. [2].name */
} encoder;

static int enc_fail(encoder *e, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

/* An encoder for b: only the fields that are read before a failure writes
 * them are cleared, not the message and path buffers (this is per call). */
static void encoder_init(encoder *e, lua_State *L, rb_outbuf *b, int array_mt) {
    e->L = L;
    e->b = b;
    e->c_locale = the_c_locale();
    e->array_mt = array_mt;
    e->nomem = 0;
    e->message[0] = '\0';
    e->path.len = 0;
    e->path.cut = 0;
    e->path.text[0] = '\0';
}

static int enc_nomem(encoder *e) {
    e->nomem = 1;
    return -1;
}

static int put(encoder *e, const char *s, size_t n) {
    if (rb_outbuf_reserve(e->b, n) < 0) return enc_nomem(e);
    memcpy(e->b->data + e->b->len, s, n);
    e->b->len += n;
    return 0;
}

#define UTF8_16 'U', 'U', 'U', 'U', 'U', 'U', 'U', 'U', 'U', 'U', 'U', 'U', 'U', 'U', 'U', 'U'

/* 0: the byte goes out as it is; 'U': it starts a UTF-8 sequence to check;
 * otherwise the letter after the backslash, 'u' meaning \u00XX. */
/* clang-format off */
static const char escape_of[256] = {
    'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'b', 't', 'n', 'u', 'f', 'r', 'u', 'u',
    'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u',
    ['"'] = '"', ['\\'] = '\\',
    [0x80] = UTF8_16, UTF8_16, UTF8_16, UTF8_16, UTF8_16, UTF8_16, UTF8_16, UTF8_16,
};
/* clang-format on */

static void put_u_escape(char *out, unsigned long cp) {
    static const char hex[] = "0123456789abcdef";
    out[0] = '\\';
    out[1] = 'u';
    out[2] = hex[cp >> 12 & 15];
    out[3] = hex[cp >> 8 & 15];
    out[4] = hex[cp >> 4 & 15];
    out[5] = hex[cp & 15];
}

/* s must be followed by a NUL byte, as Lua strings always are: the NUL needs
 * escaping, so it ends the scan of a run without a separate length test. */
static int put_string(encoder *e, const char *s, size_t len, const char *what) {
    rb_outbuf *b = e->b;
    /* Room for the unescaped case; every escape reserves its extra bytes. */
    if (rb_outbuf_reserve(b, len + 2) < 0) return enc_nomem(e);
    b->data[b->len++] = '"';
    size_t i = 0;
    for (;;) {
        size_t start = i;
        while (!escape_of[(unsigned char)s[i]]) i++;
        memcpy(b->data + b->len, s + start, i - start);
        b->len += i - start;
        if (i >= len) break;
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x80) {
            unsigned long cp;
            size_t n = rb_utf8_sequence((const unsigned char *)s + i, len - i, &cp);
            if (n == 0)
                return enc_fail(e, "cannot serialise %s that is not UTF-8 as JSON (byte %zu is 0x%02x)", what,
                                i + 1, c);
            if (cp < 0xD800 || cp > 0xDFFF) {
                memcpy(b->data + b->len, s + i, n); /* within the len reserved */
                b->len += n;
            } else {
                /* A surrogate, as a lone \ud800 from Python decodes: the
                 * same escape gives Python the same str back. */
                if (rb_outbuf_reserve(b, 6 + (len - i) + 1) < 0) return enc_nomem(e);
                put_u_escape(b->data + b->len, cp);
                b->len += 6;
            }
            i += n;
            continue;
        }
        i++;
        if (rb_outbuf_reserve(b, 6 + (len - i) + 1) < 0) return enc_nomem(e);
        char *out = b->data + b->len;
        if (escape_of[c] == 'u') {
            put_u_escape(out, c);
            b->len += 6;
        } else {
            out[0] = '\\';
            out[1] = escape_of[c];
            b->len += 2;
        }
    }
    b->data[b->len++] = '"';
    return 0;
}

/* As Python's json writes floats and ints: an integral number up to 2^63 is
 * an int (Lua cannot tell 1.0 from 1), -0.0 stays a float, and NaN and the
 * infinities are its NaN, Infinity and -Infinity. */
static int put_number(encoder *e, double d) {
    char text[40];
    size_t n;
    if (d >= -RB_TWO_POW_63 && d < RB_TWO_POW_63 && d == (double)(int64_t)d) {
        if (d == 0 && signbit(d)) return put(e, "-0.0", 4);
        n = rb_format_int64(text, (int64_t)d);
    } else if (d == RB_TWO_POW_63) {
        n = rb_format_uint64(text, (uint64_t)1 << 63);
    } else if (isnan(d)) {
        return put(e, "NaN", 3);
    } else if (isinf(d)) {
        return d > 0 ? put(e, "Infinity", 8) : put(e, "-Infinity", 9);
    } else {
        n = format_double(text, sizeof text, d, e->c_locale);
    }
    return put(e, text, n);
}

/* -> 1 if idx held an integer cdata (written, or failed to), 0 if not. */
static int put_cdata_integer(encoder *e, int idx, int *rc) {
    uint64_t bits;
    char text[24];
    switch (rb_cdata_integer(e->L, idx, &bits)) {
    case RB_INT64: *rc = put(e, text, rb_format_int64(text, (int64_t)bits)); return 1;
    case RB_UINT64: *rc = put(e, text, rb_format_uint64(text, bits)); return 1;
    default: return 0;
    }
}

static int put_key(encoder *e, int idx) {
    lua_State *L = e->L;
    int rc;
    switch (lua_type(L, idx)) {
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return put_string(e, s, len, "a table key");
    }
    case LUA_TNUMBER: {
        /* Formatted here: lua_tolstring would turn the key into a string in
         * place and break the lua_next traversal. */
        char text[40];
        size_t n = rb_format_key_number(text, sizeof text, lua_tonumber(L, idx));
        return put_string(e, text, n, "a table key");
    }
    case RB_TCDATA:
        if (put(e, "\"", 1) < 0) return -1;
        if (put_cdata_integer(e, idx, &rc)) return rc < 0 ? -1 : put(e, "\"", 1);
        /* fall through */
    default: return enc_fail(e, "cannot serialise a table key of type %s", luaL_typename(L, idx));
    }
}

static int encode_value(encoder *e, int idx, int depth);

/* On failure the stack is left as it is: the API function discards it. */
static int encode_map(encoder *e, int idx, int depth) {
    lua_State *L = e->L;
    if (put(e, "{", 1) < 0) return -1;
    int first = 1;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (!first && put(e, ",", 1) < 0) return -1;
        first = 0;
        int top = lua_gettop(L);
        if (put_key(e, top - 1) < 0 || put(e, ":", 1) < 0) return -1;
        if (encode_value(e, top, depth) < 0) {
            rb_path_key(&e->path, L, top - 1);
            return -1;
        }
        lua_pop(L, 1);
    }
    return put(e, "}", 1);
}

/* Elements 1..n of the table at idx, nil as null. */
static int encode_elements(encoder *e, int idx, double n, int depth) {
    lua_State *L = e->L;
    if (put(e, "[", 1) < 0) return -1;
    for (int i = 1; i <= (int)n; i++) {
        if (i > 1 && put(e, ",", 1) < 0) return -1;
        lua_rawgeti(L, idx, i);
        if (encode_value(e, lua_gettop(L), depth) < 0) {
            rb_path_index(&e->path, i);
            return -1;
        }
        lua_pop(L, 1);
    }
    return put(e, "]", 1);
}

static int encode_table(encoder *e, int idx, int depth) {
    lua_State *L = e->L;
    if (depth > RB_MAX_DEPTH) return enc_fail(e, "nesting deeper than %d (a cycle?)", RB_MAX_DEPTH);
    if (!lua_checkstack(L, 6)) return enc_fail(e, "Lua stack exhausted");
    double n = rb_array_length(L, idx, e->array_mt);
    if (n > INT_MAX) return enc_fail(e, "array too long");
    return n >= 0 ? encode_elements(e, idx, n, depth) : encode_map(e, idx, depth);
}

static int encode_value(encoder *e, int idx, int depth) {
    lua_State *L = e->L;
    int rc;
    switch (lua_type(L, idx)) {
    case LUA_TNIL: return put(e, "null", 4);
    case LUA_TBOOLEAN: return lua_toboolean(L, idx) ? put(e, "true", 4) : put(e, "false", 5);
    case LUA_TNUMBER: return put_number(e, lua_tonumber(L, idx));
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return put_string(e, s, len, "a string");
    }
    case LUA_TTABLE: return encode_table(e, idx, depth + 1);
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) return put(e, "null", 4);
        break;
    case RB_TCDATA:
        if (put_cdata_integer(e, idx, &rc)) return rc;
        break;
    default: break;
    }
    return enc_fail(e, "cannot serialise a value of type %s", luaL_typename(L, idx));
}

/* core.json_encode(value [, name]) -> string | nil, message. name, such as
 * "args", starts the path that a failure names. */
static int api_encode(lua_State *L) {
    lua_settop(L, 2);
    const char *root = lua_tostring(L, 2);
    rb_outbuf *b = rb_outbuf_take(L, BUF_UPV);
    encoder e;
    encoder_init(&e, L, b, ARRAY_MT_UPV);
    int rc = encode_value(&e, 1, 0);
    if (rc == 0) lua_pushlstring(L, b->data, b->len);
    rb_outbuf_done(b);
    if (rc == 0) return 1;
    if (e.nomem) return luaL_error(L, "json_encode: not enough memory");
    return rb_push_failure(L, e.message, &e.path, root);
}

/* core.json_result(...) -> string | nil, message: the reply [0, result]
 * to a call whose handler returned ..., as serial's encode_result makes it
 * (nothing or nil: null; several values: an array, nil as null), written
 * in one pass with no table for several values and no string for the
 * result alone. A failure names its path from "result". */
static int api_result(lua_State *L) {
    int n = lua_gettop(L);
    rb_outbuf *b = rb_outbuf_take(L, BUF_UPV);
    encoder e;
    encoder_init(&e, L, b, ARRAY_MT_UPV);
    int rc = put(&e, "[0,", 3);
    if (rc == 0 && n == 0) {
        rc = put(&e, "null", 4);
    } else if (rc == 0 && n == 1) {
        rc = encode_value(&e, 1, 0);
    } else if (rc == 0) {
        /* As an array table of the values would go: one level deeper. */
        rc = lua_checkstack(L, 6) ? put(&e, "[", 1) : enc_fail(&e, "Lua stack exhausted");
        for (int i = 1; rc == 0 && i <= n; i++) {
            if (i > 1 && put(&e, ",", 1) < 0) rc = -1;
            if (rc == 0 && encode_value(&e, i, 1) < 0) {
                rb_path_index(&e.path, i);
                rc = -1;
            }
        }
        if (rc == 0) rc = put(&e, "]", 1);
    }
    if (rc == 0) rc = put(&e, "]", 1);
    if (rc == 0) lua_pushlstring(L, b->data, b->len);
    rb_outbuf_done(b);
    if (rc == 0) return 1;
    if (e.nomem) return luaL_error(L, "json_result: not enough memory");
    return rb_push_failure(L, e.message, &e.path, "result");
}

/* The request [args, kwargs] in one pass: see rb_json_write_request. */
static int write_request(encoder *e, int args, int kwargs, const rb_request_shape *shape, const char **root) {
    *root = "args";
    if (!lua_checkstack(e->L, 6)) return enc_fail(e, "Lua stack exhausted");
    if (put(e, "[", 1) < 0 || encode_elements(e, args, shape->nargs, 1) < 0 || put(e, ",", 1) < 0) return -1;
    *root = "kwargs";
    if (!shape->kwargs) return put(e, "{}]", 3);
    if (encode_map(e, kwargs, 1) < 0) return -1;
    return put(e, "]", 1);
}

int rb_json_write_request(lua_State *L, int args, int kwargs, const rb_request_shape *shape, int array_mt,
                          rb_outbuf *b, char *err, size_t errlen) {
    encoder e;
    encoder_init(&e, L, b, array_mt);
    const char *root = NULL;
    int top = lua_gettop(L);
    int rc = write_request(&e, args, kwargs, shape, &root);
    lua_settop(L, top);
    if (rc == 0) return 0;
    if (e.nomem) return -2;
    rb_format_failure(err, errlen, e.message, &e.path, root);
    return -1;
}

/* core.json_request(args, kwargs) -> string | nil, message: the request
 * [args, kwargs] as a client sends it (rb_json_write_request). */
static int api_request(lua_State *L) {
    lua_settop(L, 2);
    rb_outbuf *b = rb_outbuf_take(L, BUF_UPV);
    char err[RB_REQUEST_ERROR_MAX];
    rb_request_shape shape;
    int rc = rb_request_shape_of(L, 1, 2, &shape, err, sizeof err);
    if (rc == 0) rc = rb_json_write_request(L, 1, 2, &shape, ARRAY_MT_UPV, b, err, sizeof err);
    if (rc == 0) lua_pushlstring(L, b->data, b->len);
    rb_outbuf_done(b);
    if (rc == -2) return luaL_error(L, "json_request: not enough memory");
    if (rc == 0) return 1;
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
}

/* ---- decoding ---- */

typedef struct {
    lua_State *L;
    const char *start, *p, *end; /* *end is the NUL every Lua string ends with */
    char *scratch;               /* unescaped strings; a userdata at scratch_slot */
    int scratch_slot;            /* a stack slot (nil until the first escape) */
    int array_mt;                /* the stack index of the array metatable */
    locale_t c_locale;
    char message[160];
} decoder;

/* A decoder of s (len bytes, NUL-terminated), its scratch buffer to be
 * made at stack slot scratch_slot, arrays marked with array_mt. */
static void decoder_init(decoder *d, lua_State *L, const char *s, size_t len, int scratch_slot,
                         int array_mt) {
    d->L = L;
    d->start = d->p = s;
    d->end = s + len;
    d->scratch = NULL;
    d->scratch_slot = scratch_slot;
    d->array_mt = array_mt;
    d->c_locale = the_c_locale();
    d->message[0] = '\0';
}

/* Positions are 1-based byte offsets, as string.sub counts. */
static int dec_fail(decoder *d, const char *at, const char *fmt, ...) {
    char what[120];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    snprintf(d->message, sizeof d->message, "%s at byte %zu", what, (size_t)(at - d->start) + 1);
    return -1;
}

static int dec_expected(decoder *d, const char *what) {
    if (d->p >= d->end) return dec_fail(d, d->p, "unexpected end of input (expected %s)", what);
    return dec_fail(d, d->p, "expected %s", what);
}

/* Scans stop at the NUL after the input since it is not whitespace, not a
 * digit and ends a string run, so no scan needs its own bounds test; a NUL
 * before the end is reported as the unexpected byte it is. */
static inline void skip_space(decoder *d) {
    const char *p = d->p;
    while (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t') p++;
    d->p = p;
}

static inline int is_digit(char c) {
    return c >= '0' && c <= '9';
}

/* 1 where a run of plain string bytes ends: '"', '\\', control characters. */
static const unsigned char string_stop[256] = {
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,         1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, ['"'] = 1, ['\\'] = 1,
};

static long hex4(const char *p) {
    long v = 0;
    /* One byte at a time so that the terminating NUL stops the reading. */
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        int digit = c >= '0' && c <= '9'   ? c - '0'
                    : c >= 'a' && c <= 'f' ? c - 'a' + 10
                    : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                           : -1;
        if (digit < 0) return -1;
        v = v * 16 + digit;
    }
    return v;
}

static char *put_utf8(char *out, unsigned long cp) {
    if (cp < 0x80) {
        *out++ = (char)cp;
    } else if (cp < 0x800) {
        *out++ = (char)(0xC0 | cp >> 6);
        *out++ = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *out++ = (char)(0xE0 | cp >> 12);
        *out++ = (char)(0x80 | (cp >> 6 & 0x3F));
        *out++ = (char)(0x80 | (cp & 0x3F));
    } else {
        *out++ = (char)(0xF0 | cp >> 18);
        *out++ = (char)(0x80 | (cp >> 12 & 0x3F));
        *out++ = (char)(0x80 | (cp >> 6 & 0x3F));
        *out++ = (char)(0x80 | (cp & 0x3F));
    }
    return out;
}

/* One escape at *pp, a backslash with a byte after it: its bytes go to
 * *out and *pp moves past it. */
static int unescape(decoder *d, const char **pp, char **out) {
    const char *p = *pp;
    char c;
    switch (p[1]) {
    case '"': c = '"'; break;
    case '\\': c = '\\'; break;
    case '/': c = '/'; break;
    case 'b': c = '\b'; break;
    case 'f': c = '\f'; break;
    case 'n': c = '\n'; break;
    case 'r': c = '\r'; break;
    case 't': c = '\t'; break;
    case 'u': {
        long cp = hex4(p + 2);
        size_t used = 6;
        if (cp < 0) return dec_fail(d, p, "invalid \\u escape");
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            /* Characters beyond the BMP come as a UTF-16 surrogate pair. */
            long low = p[6] == '\\' && p[7] == 'u' ? hex4(p + 8) : -1;
            if (low >= 0xDC00 && low <= 0xDFFF) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                used = 12;
            }
        }
        /* A lone surrogate (Python writes one for a str that holds it)
         * becomes its three bytes, as WTF-8 does: never a failed call, and
         * json_encode writes the same escape back. */
        *out = put_utf8(*out, (unsigned long)cp);
        *pp = p + used;
        return 0;
    }
    default:
        if (p[1] >= 0x20 && p[1] < 0x7F) return dec_fail(d, p, "invalid escape '\\%c'", p[1]);
        return dec_fail(d, p, "invalid escape");
    }
    *(*out)++ = c;
    *pp = p + 2;
    return 0;
}

/* The slow path of parse_string, from p, the first byte that ends the plain
 * run without being the closing quote. */
static int parse_escaped_string(decoder *d, const char *start, const char *p) {
    lua_State *L = d->L;
    char *out = NULL;
    while (*p != '"') {
        if (p >= d->end || (*p == '\\' && p + 1 >= d->end))
            return dec_fail(d, start - 1, "unterminated string");
        if (*p != '\\')
            return dec_fail(d, p, "unescaped control character 0x%02x in string", (unsigned char)*p);
        if (!out) {
            if (!d->scratch) {
                /* Unescaping never lengthens, and later strings have less
                 * input left: one buffer the size of the rest serves all. */
                d->scratch = lua_newuserdata(L, (size_t)(d->end - start) + 1);
                lua_replace(L, d->scratch_slot);
            }
            memcpy(d->scratch, start, (size_t)(p - start));
            out = d->scratch + (p - start);
        }
        if (unescape(d, &p, &out) < 0) return -1;
        const char *run = p;
        while (!string_stop[(unsigned char)*p]) p++;
        memcpy(out, run, (size_t)(p - run));
        out += p - run;
    }
    lua_pushlstring(L, d->scratch, (size_t)(out - d->scratch));
    d->p = p + 1;
    return 0;
}

static int parse_string(decoder *d) {
    const char *start = d->p + 1, *p = start;
    while (!string_stop[(unsigned char)*p]) p++;
    if (*p != '"') return parse_escaped_string(d, start, p);
    /* Most strings have nothing to unescape and go straight from the input. */
    lua_pushlstring(d->L, start, (size_t)(p - start));
    d->p = p + 1;
    return 0;
}

/* An integer literal too long for the fast path: exact as a 64-bit integer
 * when it fits one. -> 1 pushed, 0 it does not fit. */
static int push_long_integer(decoder *d, const char *digits, const char *end, int negative) {
    uint64_t u = 0;
    for (const char *q = digits; q < end; q++) {
        unsigned digit = (unsigned)(*q - '0');
        if (u > (UINT64_MAX - digit) / 10) return 0;
        u = u * 10 + digit;
    }
    if (!negative) {
        rb_push_uint64(d->L, u);
    } else if (u <= (uint64_t)1 << 63) {
        rb_push_int64(d->L, u == (uint64_t)1 << 63 ? INT64_MIN : -(int64_t)u);
    } else {
        return 0;
    }
    return 1;
}

static int parse_number(decoder *d) {
    const char *s = d->p, *p = s;
    int negative = *p == '-';
    if (negative) p++;
    const char *digits = p;
    if (*p == '0') {
        p++;
        if (is_digit(*p)) return dec_fail(d, s, "invalid number (leading zero)");
    } else if (is_digit(*p)) {
        while (is_digit(*p)) p++;
    } else {
        return dec_fail(d, s, "invalid number");
    }
    size_t ndigits = (size_t)(p - digits);
    int integral = 1;
    if (*p == '.') {
        p++;
        if (!is_digit(*p)) return dec_fail(d, s, "invalid number (no digit after '.')");
        while (is_digit(*p)) p++;
        integral = 0;
    }
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-') p++;
        if (!is_digit(*p)) return dec_fail(d, s, "invalid number (no digit in the exponent)");
        while (is_digit(*p)) p++;
        integral = 0;
    }
    d->p = p;
    if (integral && ndigits <= 15) {
        /* Exact below 10^15 < 2^53, and much cheaper than strtod. -0 is an
         * integer, 0, as Python reads it. */
        int64_t n = 0;
        for (const char *q = digits; q < p; q++) n = n * 10 + (*q - '0');
        lua_pushnumber(d->L, negative && n ? -(double)n : (double)n);
        return 0;
    }
    if (integral && push_long_integer(d, digits, p, negative)) return 0;
    /* strtod stops where the JSON grammar did: its longer forms
     * (hexadecimal, inf, nan) cannot begin a token that got here. Beyond
     * 64 bits an integer is a double, as near as one gets. */
    char *stop;
    double v = strtod_l(s, &stop, d->c_locale);
    if (stop != p) return dec_fail(d, s, "invalid number");
    lua_pushnumber(d->L, v);
    return 0;
}

static int parse_literal(decoder *d, const char *word, size_t len) {
    if ((size_t)(d->end - d->p) < len || memcmp(d->p, word, len) != 0)
        return dec_fail(d, d->p, "invalid literal (expected %s)", word);
    d->p += len;
    return 0;
}

static int parse_value(decoder *d, int depth);

/* Into an array or object. The depth limit also bounds the recursion of
 * parse_value and the Lua stack held by the containers being built: the
 * container, a key, a value, and two more while a 64-bit integer is made. */
static int enter(decoder *d, int depth) {
    if (depth > RB_MAX_DEPTH) return dec_fail(d, d->p, "nesting deeper than %d", RB_MAX_DEPTH);
    if (!lua_checkstack(d->L, 6)) return dec_fail(d, d->p, "Lua stack exhausted");
    d->p++;
    skip_space(d);
    return 0;
}

static int parse_array(decoder *d, int depth) {
    lua_State *L = d->L;
    if (enter(d, depth) < 0) return -1;
    lua_createtable(L, *d->p == ']' ? 0 : 4, 0);
    lua_pushvalue(L, d->array_mt);
    lua_setmetatable(L, -2);
    if (*d->p == ']') {
        d->p++;
        return 0;
    }
    for (int n = 1;; n++) {
        if (parse_value(d, depth) < 0) return -1;
        lua_rawseti(L, -2, n);
        skip_space(d);
        if (*d->p == ',') {
            d->p++;
        } else if (*d->p == ']') {
            d->p++;
            return 0;
        } else {
            return dec_expected(d, "',' or ']'");
        }
    }
}

static int parse_object(decoder *d, int depth) {
    lua_State *L = d->L;
    if (enter(d, depth) < 0) return -1;
    lua_createtable(L, 0, *d->p == '}' ? 0 : 4);
    if (*d->p == '}') {
        d->p++;
        return 0;
    }
    for (;;) {
        if (*d->p != '"') return dec_expected(d, "a string key");
        if (parse_string(d) < 0) return -1;
        skip_space(d);
        if (*d->p != ':') return dec_expected(d, "':'");
        d->p++;
        if (parse_value(d, depth) < 0) return -1;
        lua_rawset(L, -3); /* a repeated key: the last one wins */
        skip_space(d);
        if (*d->p == ',') {
            d->p++;
            skip_space(d);
        } else if (*d->p == '}') {
            d->p++;
            return 0;
        } else {
            return dec_expected(d, "',' or '}'");
        }
    }
}

static int parse_value(decoder *d, int depth) {
    skip_space(d);
    unsigned char c = (unsigned char)*d->p;
    switch (c) {
    case '{': return parse_object(d, depth + 1);
    case '[': return parse_array(d, depth + 1);
    case '"': return parse_string(d);
    case 't':
        if (parse_literal(d, "true", 4) < 0) return -1;
        lua_pushboolean(d->L, 1);
        return 0;
    case 'f':
        if (parse_literal(d, "false", 5) < 0) return -1;
        lua_pushboolean(d->L, 0);
        return 0;
    case 'n':
        if (parse_literal(d, "null", 4) < 0) return -1;
        lua_pushlightuserdata(d->L, NULL);
        return 0;
    case 'N':
        if (parse_literal(d, "NaN", 3) < 0) return -1;
        lua_pushnumber(d->L, NAN);
        return 0;
    case 'I':
        if (parse_literal(d, "Infinity", 8) < 0) return -1;
        lua_pushnumber(d->L, HUGE_VAL);
        return 0;
    case '-':
        if (d->p[1] == 'I') {
            if (parse_literal(d, "-Infinity", 9) < 0) return -1;
            lua_pushnumber(d->L, -HUGE_VAL);
            return 0;
        }
        return parse_number(d);
    case '0':
    case '1':
    case '2':
    case '3':
    case '4':
    case '5':
    case '6':
    case '7':
    case '8':
    case '9': return parse_number(d);
    default:
        if (d->p >= d->end) return dec_expected(d, "a value");
        if (c >= 0x20 && c < 0x7F) return dec_fail(d, d->p, "unexpected character '%c'", c);
        return dec_fail(d, d->p, "unexpected byte 0x%02x", c);
    }
}

/* core.json_decode(string) -> value | nil, message */
static int api_decode(lua_State *L) {
    if (!lua_isstring(L, 1)) {
        lua_pushnil(L);
        lua_pushfstring(L, "json_decode expects a string, got %s", luaL_typename(L, 1));
        return 2;
    }
    size_t len;
    const char *s = lua_tolstring(L, 1, &len);
    lua_settop(L, 1);
    lua_pushnil(L); /* slot 2: the scratch buffer, made on the first escape */
    decoder d;
    decoder_init(&d, L, s, len, 2, ARRAY_MT_UPV);
    skip_space(&d);
    if (d.p >= d.end) {
        lua_pushnil(L);
        lua_pushstring(L, len ? "empty input (only whitespace)" : "empty input");
        return 2;
    }
    if (parse_value(&d, 0) == 0) {
        skip_space(&d);
        if (d.p >= d.end) return 1;
        dec_fail(&d, d.p, "unexpected data after the value");
    }
    lua_pushnil(L);
    lua_pushstring(L, d.message);
    return 2;
}

static int at_literal(decoder *d, const char *word, size_t len) {
    return (size_t)(d->end - d->p) >= len && memcmp(d->p, word, len) == 0;
}

/* core.json_call_args(body) -> true, args... | false. A request of the
 * plain shape, [[a1, ..., an], {}], its arguments decoded straight onto the
 * stack (a top-level null as nil, as bind makes it): no table for the
 * request, its args or its kwargs. false for anything else (kwargs given,
 * args that are not an array, a malformed body, too many arguments for the
 * stack): the caller decodes that with json_decode, which judges it. */
static int api_call_args(lua_State *L) {
    size_t len;
    const char *s = lua_type(L, 1) == LUA_TSTRING ? lua_tolstring(L, 1, &len) : NULL;
    if (!s) goto other;
    lua_settop(L, 1);
    lua_pushnil(L); /* slot 2: the scratch buffer, made on the first escape */
    lua_pushboolean(L, 1);
    decoder d;
    decoder_init(&d, L, s, len, 2, ARRAY_MT_UPV);
    skip_space(&d);
    if (*d.p != '[') goto other;
    d.p++;
    skip_space(&d);
    if (*d.p != '[') goto other;
    d.p++;
    skip_space(&d);
    if (*d.p == ']') {
        d.p++;
    } else {
        for (;;) {
            if (!lua_checkstack(L, 8)) goto other;
            skip_space(&d);
            if (at_literal(&d, "null", 4)) {
                d.p += 4;
                lua_pushnil(L);
            } else if (parse_value(&d, 2) < 0) {
                goto other;
            }
            skip_space(&d);
            if (*d.p == ',') {
                d.p++;
            } else if (*d.p == ']') {
                d.p++;
                break;
            } else {
                goto other;
            }
        }
    }
    skip_space(&d);
    if (*d.p != ',') goto other;
    d.p++;
    skip_space(&d);
    if (*d.p != '{') goto other;
    d.p++;
    skip_space(&d);
    if (*d.p != '}') goto other;
    d.p++;
    skip_space(&d);
    if (*d.p != ']') goto other;
    d.p++;
    skip_space(&d);
    if (d.p < d.end) goto other;
    return lua_gettop(L) - 2;
other:
    lua_settop(L, 0);
    lua_pushboolean(L, 0);
    return 1;
}

/* A reply of the plain shape [0, result] or [1, error]: code and result
 * pushed. */
static int read_reply(decoder *d) {
    skip_space(d);
    if (*d->p != '[') return -1;
    d->p++;
    skip_space(d);
    if (*d->p != '0' && *d->p != '1') return -1;
    lua_pushnumber(d->L, *d->p - '0');
    d->p++;
    skip_space(d);
    if (*d->p != ',') return -1;
    d->p++;
    if (parse_value(d, 1) < 0) return -1;
    skip_space(d);
    if (*d->p != ']') return -1;
    d->p++;
    skip_space(d);
    return d->p < d->end ? -1 : 0;
}

int rb_json_push_reply(lua_State *L, const char *s, size_t len, int array_mt) {
    int top = lua_gettop(L);
    if (!lua_checkstack(L, 8)) return -1;
    lua_pushnil(L); /* the scratch buffer, made on the first escape */
    decoder d;
    decoder_init(&d, L, s, len, top + 1, array_mt);
    if (read_reply(&d) < 0) {
        lua_settop(L, top);
        return -1;
    }
    lua_remove(L, top + 1);
    return 0;
}

/* core.json_reply(body) -> 0 | 1, result | false. A reply of the plain
 * shape [0, result] or [1, error] decoded with no table around it; false
 * for anything else, which the caller decodes with json_decode. */
static int api_reply(lua_State *L) {
    size_t len;
    const char *s = lua_type(L, 1) == LUA_TSTRING ? lua_tolstring(L, 1, &len) : NULL;
    lua_settop(L, 1);
    if (s && rb_json_push_reply(L, s, len, ARRAY_MT_UPV) == 0) return 2;
    lua_pushboolean(L, 0);
    return 1;
}

/* core.utf8_check(s) -> true | false, position of the first bad byte.
 * Strict, as Python decodes a str: what JSON can carry as text. */
static int api_utf8_check(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    size_t at = rb_utf8_invalid_at((const unsigned char *)s, len);
    lua_pushboolean(L, at == len);
    if (at == len) return 1;
    lua_pushnumber(L, (lua_Number)at + 1);
    return 2;
}

/* Each API function is a closure over its output buffer (nil for a
 * decoder) and the array metatable. */
static void set_closure(lua_State *L, lua_CFunction fn, int with_buffer, const char *name) {
    if (with_buffer)
        rb_outbuf_new(L);
    else
        lua_pushnil(L);
    luaL_getmetatable(L, RB_ARRAY_MT); /* shared with msgpack.c */
    lua_pushcclosure(L, fn, 2);
    lua_setfield(L, -2, name);
}

void rb_open_json(lua_State *L) {
    rb_values_open(L);
    if (!the_c_locale()) luaL_error(L, "json: cannot create the C locale");
    luaL_getmetatable(L, RB_ARRAY_MT);
    lua_setfield(L, -2, "array_mt");
    set_closure(L, api_encode, 1, "json_encode");
    set_closure(L, api_result, 1, "json_result");
    set_closure(L, api_request, 1, "json_request");
    set_closure(L, api_decode, 0, "json_decode");
    set_closure(L, api_call_args, 0, "json_call_args");
    set_closure(L, api_reply, 0, "json_reply");
    lua_pushcfunction(L, api_utf8_check);
    lua_setfield(L, -2, "utf8_check");
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "null");
}

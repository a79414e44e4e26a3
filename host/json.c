/* JSON for Lua values, RabiBridge's default serialiser and the hot path of
 * every call: requests are [args, kwargs], replies [err_code, result].
 *
 * lua-cjson as Debian ships it (2.1.0) has no array metatable, so [] and {}
 * both decode to an empty table and both re-encode as {}: empty args would
 * come back as an object. Here decoded arrays carry the array metatable
 * (the registry's "rabibridge.array_mt", shared with msgpack.c) and tables
 * carrying it always encode as arrays; null is a NULL lightuserdata, the
 * same value as cjson.null.
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

#define ARRAY_MT "rabibridge.array_mt"
#define STATE_MT "rabibridge.json_state"
#define MAX_DEPTH 1000
/* Encode buffers up to this size are kept for the next call; a bigger one
 * is freed so that one huge reply does not pin its memory forever. */
#define KEEP_BUFFER ((size_t)1 << 20)
#define TWO_POW_53 9007199254740992.0

/* Both functions are closures over these. */
#define STATE_UPV lua_upvalueindex(1)
#define ARRAY_MT_UPV lua_upvalueindex(2)

typedef struct {
    char *data;
    size_t len, cap;
    /* Set while an encode writes into data. A __gc metamethod run by the
     * allocation of the result string could call json_encode again; that
     * call must not reuse the buffer, so it takes a fresh one. */
    int busy;
    /* strtod_l with this ignores a process-wide setlocale(LC_NUMERIC). */
    locale_t c_locale;
} json_state;

static int state_gc(lua_State *L) {
    json_state *st = luaL_checkudata(L, 1, STATE_MT);
    free(st->data);
    st->data = NULL;
    st->cap = st->len = 0;
    if (st->c_locale) freelocale(st->c_locale);
    st->c_locale = (locale_t)0;
    return 0;
}

static json_state *new_state(lua_State *L) {
    json_state *st = lua_newuserdata(L, sizeof *st);
    memset(st, 0, sizeof *st);
    if (luaL_newmetatable(L, STATE_MT)) {
        lua_pushcfunction(L, state_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    return st;
}

static int buf_grow(json_state *b, size_t need) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < need) {
        if (cap > SIZE_MAX / 2) return -1;
        cap *= 2;
    }
    char *data = realloc(b->data, cap);
    if (!data) return -1;
    b->data = data;
    b->cap = cap;
    return 0;
}

static inline int buf_reserve(json_state *b, size_t need) {
    return b->cap - b->len >= need ? 0 : buf_grow(b, need);
}

/* ---- numbers as text ---- */

/* Integers print without a decimal point: 3, not 3.0. */
static size_t format_integer(char *out, int64_t v) {
    char digits[24];
    size_t n = 0;
    uint64_t u = v < 0 ? -(uint64_t)v : (uint64_t)v;
    do {
        digits[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    size_t len = 0;
    if (v < 0) out[len++] = '-';
    while (n) out[len++] = digits[--n];
    out[len] = '\0';
    return len;
}

/* printf follows the process's LC_NUMERIC, which may put a comma (or a
 * multibyte separator) where JSON needs a '.'. What %g prints is digits,
 * signs, 'e' and the separator, so anything else is the separator. */
static size_t c_decimal_point(char *s, size_t len) {
    size_t j = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if ((c >= '0' && c <= '9') || c == '-' || c == '+' || c == 'e')
            s[j++] = c;
        else if (j == 0 || s[j - 1] != '.')
            s[j++] = '.';
    }
    s[j] = '\0';
    return j;
}

static size_t format_g(char *out, size_t size, int precision, double d) {
    int n = snprintf(out, size, "%.*g", precision, d);
    if (n < 0 || (size_t)n >= size) n = 0; /* cannot happen: %.17g needs 24 bytes at most */
    return c_decimal_point(out, (size_t)n);
}

/* A finite non-integer: %.15g when that reads back as the same double, so
 * 0.1 stays "0.1" rather than 0.10000000000000001; otherwise %.17g, which
 * always does. (Trying %.16g in between costs more than it saves.) */
static size_t format_double(char *out, size_t size, double d, locale_t loc) {
    size_t n = format_g(out, size, 15, d);
    if (strtod_l(out, NULL, loc) == d) return n;
    return format_g(out, size, 17, d);
}

/* ---- encoding ---- */

typedef struct {
    lua_State *L;
    json_state *b;
    locale_t c_locale;
    int nomem;
    char message[128];
    char path[128]; /* where the failure is, e.g. [2].name */
    size_t pathlen;
    int path_cut;
} encoder;

static int enc_fail(encoder *e, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

static int enc_nomem(encoder *e) {
    e->nomem = 1;
    return -1;
}

/* The path is built while a failure unwinds, each level putting its own step
 * in front; when it outgrows the buffer the innermost steps are dropped. */
static void path_prepend(encoder *e, const char *step, size_t n) {
    size_t cap = sizeof e->path - 1;
    if (n > cap) n = cap;
    size_t keep = e->pathlen;
    if (keep + n > cap) {
        keep = cap - n;
        e->path_cut = 1;
    }
    memmove(e->path + n, e->path, keep);
    memcpy(e->path, step, n);
    e->pathlen = keep + n;
    e->path[e->pathlen] = '\0';
}

static void path_index(encoder *e, int i) {
    char step[24];
    int n = snprintf(step, sizeof step, "[%d]", i);
    if (n > 0) path_prepend(e, step, (size_t)n);
}

static int is_identifier(const char *s, size_t len) {
    if (len == 0 || len > 40 || (s[0] >= '0' && s[0] <= '9')) return 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_'))
            return 0;
    }
    return 1;
}

static size_t format_key_number(char *out, size_t size, double k);

static void path_key(encoder *e, int idx) {
    char step[64];
    int n;
    if (lua_type(e->L, idx) == LUA_TSTRING) {
        size_t len;
        const char *s = lua_tolstring(e->L, idx, &len);
        if (is_identifier(s, len))
            n = snprintf(step, sizeof step, ".%s", s);
        else
            n = snprintf(step, sizeof step, "[\"%.*s%s\"]", len > 40 ? 40 : (int)len, s,
                         len > 40 ? "..." : "");
    } else {
        char num[40];
        format_key_number(num, sizeof num, lua_tonumber(e->L, idx));
        n = snprintf(step, sizeof step, "[%s]", num);
    }
    if (n > 0) path_prepend(e, step, (size_t)n < sizeof step ? (size_t)n : sizeof step - 1);
}

static int put(encoder *e, const char *s, size_t n) {
    if (buf_reserve(e->b, n) < 0) return enc_nomem(e);
    memcpy(e->b->data + e->b->len, s, n);
    e->b->len += n;
    return 0;
}

/* 0: the byte goes out as it is; otherwise the letter after the backslash,
 * 'u' meaning \u00XX. Bytes from 0x80 up are UTF-8 and pass unchanged. */
static const char escape_of[256] = {
    'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'b', 't', 'n', 'u', 'f', 'r', 'u', 'u',         'u',
    'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', ['"'] = '"', ['\\'] = '\\',
};

/* s must be followed by a NUL byte, as Lua strings always are: the NUL needs
 * escaping, so it ends the scan of a run without a separate length test. */
static int put_string(encoder *e, const char *s, size_t len) {
    static const char hex[] = "0123456789abcdef";
    json_state *b = e->b;
    /* Room for the unescaped case; every escape reserves its extra bytes. */
    if (buf_reserve(b, len + 2) < 0) return enc_nomem(e);
    b->data[b->len++] = '"';
    size_t i = 0;
    for (;;) {
        size_t start = i;
        while (!escape_of[(unsigned char)s[i]]) i++;
        memcpy(b->data + b->len, s + start, i - start);
        b->len += i - start;
        if (i >= len) break;
        unsigned char c = (unsigned char)s[i++];
        if (buf_reserve(b, 6 + (len - i) + 1) < 0) return enc_nomem(e);
        char *out = b->data + b->len;
        out[0] = '\\';
        out[1] = escape_of[c];
        if (out[1] == 'u') {
            out[2] = '0';
            out[3] = '0';
            out[4] = hex[c >> 4];
            out[5] = hex[c & 15];
            b->len += 6;
        } else {
            b->len += 2;
        }
    }
    b->data[b->len++] = '"';
    return 0;
}

static int put_number(encoder *e, double d) {
    char text[40];
    size_t n;
    /* The range test also turns NaN away, since it compares false. */
    if (d > -TWO_POW_53 && d < TWO_POW_53 && d == (double)(int64_t)d)
        n = format_integer(text, (int64_t)d);
    else if (!isfinite(d))
        return enc_fail(e, "cannot serialise NaN or infinity");
    else
        n = format_double(text, sizeof text, d, e->c_locale);
    return put(e, text, n);
}

/* A number key as tostring() writes it (%.14g), except that every integer
 * below 2^53 is written out in full. */
static size_t format_key_number(char *out, size_t size, double k) {
    if (k > -TWO_POW_53 && k < TWO_POW_53 && k == (double)(int64_t)k) return format_integer(out, (int64_t)k);
    if (isinf(k)) return (size_t)snprintf(out, size, "%s", k > 0 ? "inf" : "-inf");
    return format_g(out, size, 14, k);
}

static int put_key(encoder *e, int idx) {
    lua_State *L = e->L;
    switch (lua_type(L, idx)) {
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return put_string(e, s, len);
    }
    case LUA_TNUMBER: {
        /* Formatted here: lua_tolstring would turn the key into a string in
         * place and break the lua_next traversal. */
        char text[40];
        size_t n = format_key_number(text, sizeof text, lua_tonumber(L, idx));
        return put_string(e, text, n);
    }
    default: return enc_fail(e, "cannot serialise a table key of type %s", luaL_typename(L, idx));
    }
}

/* The length to encode idx as an array, or -1 for an object. */
static double array_length(lua_State *L, int idx) {
    if (lua_getmetatable(L, idx)) {
        int marked = lua_rawequal(L, -1, ARRAY_MT_UPV);
        lua_pop(L, 1);
        if (marked) return (double)lua_objlen(L, idx);
    }
    /* Without the mark, keys 1..n with some holes still make an array: Lua
     * cannot store a nil in a sequence. The scan stops at the first key that
     * is not a positive integer, usually the first key of an object. */
    double count = 0, max = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        double k = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
        if (!(k >= 1) || k != floor(k)) {
            lua_pop(L, 1);
            return -1;
        }
        if (k > max) max = k;
        count++;
    }
    if (count == 0) return -1; /* an empty unmarked table is an object */
    return max <= 2 * count ? max : -1;
}

static int encode_value(encoder *e, int idx, int depth);

static int encode_table(encoder *e, int idx, int depth) {
    lua_State *L = e->L;
    if (depth > MAX_DEPTH) return enc_fail(e, "nesting deeper than %d (a cycle?)", MAX_DEPTH);
    if (!lua_checkstack(L, 3)) return enc_fail(e, "Lua stack exhausted");
    double n = array_length(L, idx);
    if (n > INT_MAX) return enc_fail(e, "array too long");
    if (n >= 0) {
        if (put(e, "[", 1) < 0) return -1;
        for (int i = 1; i <= (int)n; i++) {
            if (i > 1 && put(e, ",", 1) < 0) return -1;
            lua_rawgeti(L, idx, i);
            if (encode_value(e, lua_gettop(L), depth) < 0) {
                path_index(e, i);
                return -1;
            }
            lua_pop(L, 1);
        }
        return put(e, "]", 1);
    }
    /* On failure the stack is left as it is: json_encode discards it. */
    if (put(e, "{", 1) < 0) return -1;
    int first = 1;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (!first && put(e, ",", 1) < 0) return -1;
        first = 0;
        if (put_key(e, -2) < 0 || put(e, ":", 1) < 0) return -1;
        if (encode_value(e, lua_gettop(L), depth) < 0) {
            path_key(e, -2);
            return -1;
        }
        lua_pop(L, 1);
    }
    return put(e, "}", 1);
}

static int encode_value(encoder *e, int idx, int depth) {
    lua_State *L = e->L;
    switch (lua_type(L, idx)) {
    case LUA_TNIL: return put(e, "null", 4);
    case LUA_TBOOLEAN: return lua_toboolean(L, idx) ? put(e, "true", 4) : put(e, "false", 5);
    case LUA_TNUMBER: return put_number(e, lua_tonumber(L, idx));
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return put_string(e, s, len);
    }
    case LUA_TTABLE: return encode_table(e, idx, depth + 1);
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) return put(e, "null", 4);
        break;
    default: break;
    }
    return enc_fail(e, "cannot serialise a value of type %s", luaL_typename(L, idx));
}

/* core.json_encode(value) -> string | nil, message */
static int api_encode(lua_State *L) {
    lua_settop(L, 1);
    json_state *st = lua_touserdata(L, STATE_UPV);
    json_state *b = st->busy ? new_state(L) : st;
    /* Cleared only after the result string is made. Should that allocation
     * raise, the flag stays set and later calls each use a fresh buffer:
     * slower, never wrong. */
    b->busy = 1;
    b->len = 0;
    encoder e = {.L = L, .b = b, .c_locale = st->c_locale};
    int rc = encode_value(&e, 1, 0);
    if (rc == 0) lua_pushlstring(L, b->data, b->len);
    b->busy = 0;
    if (b->cap > KEEP_BUFFER) {
        free(b->data);
        b->data = NULL;
        b->cap = b->len = 0;
    }
    if (rc == 0) return 1;
    if (e.nomem) return luaL_error(L, "json_encode: not enough memory");
    lua_pushnil(L);
    if (e.pathlen)
        lua_pushfstring(L, "%s at %s%s", e.message, e.path, e.path_cut ? "..." : "");
    else
        lua_pushstring(L, e.message);
    return 2;
}

/* ---- decoding ---- */

typedef struct {
    lua_State *L;
    const char *start, *p, *end; /* *end is the NUL every Lua string ends with */
    char *scratch;               /* unescaped strings; a userdata at stack slot 2 */
    locale_t c_locale;
    char message[160];
} decoder;

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
        if (cp >= 0xDC00 && cp <= 0xDFFF) return dec_fail(d, p, "lone surrogate \\u%04lx", cp);
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            /* Characters beyond the BMP come as a UTF-16 surrogate pair. */
            long low = p[6] == '\\' && p[7] == 'u' ? hex4(p + 8) : -1;
            if (low < 0xDC00 || low > 0xDFFF) return dec_fail(d, p, "lone surrogate \\u%04lx", cp);
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            used = 12;
        }
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
                lua_replace(L, 2);
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
    double v;
    if (integral && ndigits <= 15) {
        /* Exact below 10^15 < 2^53, and much cheaper than strtod. */
        int64_t n = 0;
        for (const char *q = digits; q < p; q++) n = n * 10 + (*q - '0');
        v = negative ? -(double)n : (double)n;
    } else {
        /* strtod stops where the JSON grammar did: its longer forms
         * (hexadecimal, inf, nan) cannot begin a token that got here. */
        char *stop;
        v = strtod_l(s, &stop, d->c_locale);
        if (stop != p) return dec_fail(d, s, "invalid number");
    }
    lua_pushnumber(d->L, v);
    d->p = p;
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
 * parse_value and the Lua stack held by the containers being built. */
static int enter(decoder *d, int depth) {
    if (depth > MAX_DEPTH) return dec_fail(d, d->p, "nesting deeper than %d", MAX_DEPTH);
    if (!lua_checkstack(d->L, 3)) return dec_fail(d, d->p, "Lua stack exhausted");
    d->p++;
    skip_space(d);
    return 0;
}

static int parse_array(decoder *d, int depth) {
    lua_State *L = d->L;
    if (enter(d, depth) < 0) return -1;
    lua_createtable(L, *d->p == ']' ? 0 : 4, 0);
    lua_pushvalue(L, ARRAY_MT_UPV);
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
    case '-':
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
    json_state *st = lua_touserdata(L, STATE_UPV);
    decoder d = {.L = L, .start = s, .p = s, .end = s + len, .c_locale = st->c_locale};
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

void rb_open_json(lua_State *L) {
    json_state *st = new_state(L);
    st->c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    if (!st->c_locale) luaL_error(L, "json: cannot create the C locale");
    luaL_newmetatable(L, ARRAY_MT); /* or the one msgpack.c or core.c made */
    lua_pushvalue(L, -1);
    lua_setfield(L, -4, "array_mt");
    lua_pushvalue(L, -2);
    lua_pushvalue(L, -2);
    lua_pushcclosure(L, api_encode, 2);
    lua_setfield(L, -4, "json_encode");
    lua_pushvalue(L, -2);
    lua_pushvalue(L, -2);
    lua_pushcclosure(L, api_decode, 2);
    lua_setfield(L, -4, "json_decode");
    lua_pop(L, 2);
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "null");
}

/* Lua values as both wire codecs see them: see values.h. */
#include "values.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lauxlib.h"

#define INT64_KEY "rabibridge.int64" /* { ffi.istype, int64_t, uint64_t } */
#define OUTBUF_MT "rabibridge.outbuf"
/* A buffer up to this size is kept for the next encode; a bigger one is
 * freed so that one huge reply does not pin its memory forever. */
#define KEEP_BUFFER ((size_t)1 << 20)

/* The array metatable is also kept under this address: a per-call lookup
 * that hashes no string. */
static const char array_mt_key = 0;

void rb_values_open(lua_State *L) {
    luaL_newmetatable(L, RB_ARRAY_MT);
    lua_pushlightuserdata(L, (void *)&array_mt_key);
    lua_insert(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
    lua_getfield(L, LUA_REGISTRYINDEX, INT64_KEY);
    int done = lua_istable(L, -1);
    lua_pop(L, 1);
    if (done) return;
    lua_getglobal(L, "require");
    lua_pushliteral(L, "ffi");
    lua_call(L, 1, 1);
    lua_createtable(L, 3, 0);
    lua_getfield(L, -2, "istype");
    lua_rawseti(L, -2, 1);
    const char *types[] = {"int64_t", "uint64_t"};
    for (int i = 0; i < 2; i++) {
        lua_getfield(L, -2, "typeof");
        lua_pushstring(L, types[i]);
        lua_call(L, 1, 1);
        lua_rawseti(L, -2, i + 2);
    }
    lua_setfield(L, LUA_REGISTRYINDEX, INT64_KEY);
    lua_pop(L, 1);
}

/* ---- tables ---- */

int rb_push_array_mt(lua_State *L) {
    lua_pushlightuserdata(L, (void *)&array_mt_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    return lua_gettop(L);
}

/* Counts the keys of the table at idx and finds the highest; -1 at the
 * first key that is not a positive integer. */
static int integer_keys(lua_State *L, int idx, double *count, double *max) {
    *count = *max = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        double k = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
        if (!(k >= 1) || k != floor(k) || isinf(k)) {
            lua_pop(L, 1);
            return -1;
        }
        if (k > *max) *max = k;
        (*count)++;
    }
    return 0;
}

double rb_array_length(lua_State *L, int idx, int mt_idx) {
    if (lua_getmetatable(L, idx)) {
        int marked = lua_rawequal(L, -1, mt_idx);
        lua_pop(L, 1);
        if (marked) return (double)lua_objlen(L, idx);
    }
    /* Without the mark, keys 1..n with some holes still make an array: Lua
     * cannot store a nil in a sequence. The scan stops at the first key that
     * is not a positive integer, usually the first key of a map. */
    double count, max;
    if (integer_keys(L, idx, &count, &max) < 0 || count == 0)
        return -1; /* an empty unmarked table is a map */
    return max <= 2 * count ? max : -1;
}

/* ---- 64-bit integers ---- */

int rb_cdata_integer(lua_State *L, int idx, uint64_t *bits) {
    if (lua_type(L, idx) != RB_TCDATA) return RB_NOT_INTEGER;
    if (idx < 0) idx = lua_gettop(L) + idx + 1;
    lua_getfield(L, LUA_REGISTRYINDEX, INT64_KEY);
    int kind = RB_NOT_INTEGER;
    for (int k = RB_INT64; k <= RB_UINT64 && kind == RB_NOT_INTEGER; k++) {
        lua_rawgeti(L, -1, 1);
        lua_rawgeti(L, -2, k + 1);
        lua_pushvalue(L, idx);
        lua_call(L, 2, 1);
        if (lua_toboolean(L, -1)) kind = k;
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    /* For cdata, lua_topointer is the address of its payload. */
    if (kind) memcpy(bits, lua_topointer(L, idx), sizeof *bits);
    return kind;
}

static void push_cdata(lua_State *L, int kind, uint64_t bits) {
    lua_getfield(L, LUA_REGISTRYINDEX, INT64_KEY);
    lua_rawgeti(L, -1, kind + 1);
    lua_call(L, 0, 1); /* a new zero of that type, ours to fill */
    memcpy((void *)lua_topointer(L, -1), &bits, sizeof bits);
    lua_remove(L, -2);
}

void rb_push_int64(lua_State *L, int64_t v) {
    if (v >= -(int64_t)RB_TWO_POW_53 && v <= (int64_t)RB_TWO_POW_53)
        lua_pushnumber(L, (lua_Number)v);
    else
        push_cdata(L, RB_INT64, (uint64_t)v);
}

void rb_push_uint64(lua_State *L, uint64_t v) {
    if (v <= (uint64_t)RB_TWO_POW_53)
        lua_pushnumber(L, (lua_Number)v);
    else
        push_cdata(L, v <= INT64_MAX ? RB_INT64 : RB_UINT64, v);
}

/* ---- UTF-8 ---- */

size_t rb_utf8_sequence(const unsigned char *s, size_t avail, unsigned long *cp) {
    unsigned char c = s[0];
    size_t n;
    unsigned long v, min;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2, v = c & 0x1F, min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3, v = c & 0x0F, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4, v = c & 0x07, min = 0x10000;
    } else {
        return 0; /* a continuation byte, C0/C1 (always overlong) or F5 up */
    }
    if (avail < n) return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        v = v << 6 | (s[i] & 0x3F);
    }
    if (v < min || v > 0x10FFFF) return 0;
    *cp = v;
    return n;
}

size_t rb_utf8_invalid_at(const unsigned char *s, size_t len) {
    size_t i = 0;
    while (i < len) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        unsigned long cp;
        size_t n = rb_utf8_sequence(s + i, len - i, &cp);
        if (n == 0 || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
        i += n;
    }
    return len;
}

/* ---- numbers as text ---- */

/* Two digits per division, written from the end: every request carries
 * two of these (its correlation id and its expiration). */
size_t rb_format_uint64(char *out, uint64_t u) {
    static const char pairs[] =
        "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
        "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
        "8081828384858687888990919293949596979899";
    static const uint64_t powers[] = {10ull,
                                      100ull,
                                      1000ull,
                                      10000ull,
                                      100000ull,
                                      1000000ull,
                                      10000000ull,
                                      100000000ull,
                                      1000000000ull,
                                      10000000000ull,
                                      100000000000ull,
                                      1000000000000ull,
                                      10000000000000ull,
                                      100000000000000ull,
                                      1000000000000000ull,
                                      10000000000000000ull,
                                      100000000000000000ull,
                                      1000000000000000000ull,
                                      10000000000000000000ull};
    size_t len = 1;
    while (len < 20 && u >= powers[len - 1]) len++;
    out[len] = '\0';
    char *p = out + len;
    while (u >= 100) {
        p -= 2;
        memcpy(p, pairs + 2 * (u % 100), 2);
        u /= 100;
    }
    if (u >= 10)
        memcpy(p - 2, pairs + 2 * u, 2);
    else
        p[-1] = (char)('0' + u);
    return len;
}

size_t rb_format_int64(char *out, int64_t v) {
    if (v >= 0) return rb_format_uint64(out, (uint64_t)v);
    out[0] = '-';
    return 1 + rb_format_uint64(out + 1, -(uint64_t)v);
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

size_t rb_format_g(char *out, size_t size, int precision, double d) {
    int n = snprintf(out, size, "%.*g", precision, d);
    if (n < 0 || (size_t)n >= size) n = 0; /* cannot happen: %.17g needs 24 bytes at most */
    return c_decimal_point(out, (size_t)n);
}

size_t rb_format_key_number(char *out, size_t size, double k) {
    if (k > -RB_TWO_POW_53 && k < RB_TWO_POW_53 && k == (double)(int64_t)k)
        return rb_format_int64(out, (int64_t)k);
    if (isinf(k)) return (size_t)snprintf(out, size, "%s", k > 0 ? "inf" : "-inf");
    return rb_format_g(out, size, 14, k);
}

/* ---- the output buffer ---- */

static int outbuf_gc(lua_State *L) {
    rb_outbuf *b = luaL_checkudata(L, 1, OUTBUF_MT);
    free(b->data);
    memset(b, 0, sizeof *b);
    return 0;
}

rb_outbuf *rb_outbuf_new(lua_State *L) {
    rb_outbuf *b = lua_newuserdata(L, sizeof *b);
    memset(b, 0, sizeof *b);
    if (luaL_newmetatable(L, OUTBUF_MT)) {
        lua_pushcfunction(L, outbuf_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    return b;
}

int rb_outbuf_grow(rb_outbuf *b, size_t need) {
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

rb_outbuf *rb_outbuf_take(lua_State *L, int upv) {
    rb_outbuf *b = lua_touserdata(L, upv);
    /* Should the result string's allocation raise, busy stays set and later
     * calls each use a fresh buffer: slower, never wrong. */
    if (b->busy) b = rb_outbuf_new(L);
    b->busy = 1;
    b->len = 0;
    return b;
}

void rb_outbuf_done(rb_outbuf *b) {
    b->busy = 0;
    if (b->cap > KEEP_BUFFER) {
        free(b->data);
        b->data = NULL;
        b->cap = b->len = 0;
    }
}

/* ---- where a value sits ---- */

static void path_prepend(rb_path *p, const char *step, size_t n) {
    size_t cap = sizeof p->text - 1;
    if (n > cap) n = cap;
    size_t keep = p->len;
    if (keep + n > cap) {
        keep = cap - n;
        p->cut = 1;
    }
    memmove(p->text + n, p->text, keep);
    memcpy(p->text, step, n);
    p->len = keep + n;
    p->text[p->len] = '\0';
}

void rb_path_index(rb_path *p, double i) {
    char step[40] = "[";
    size_t n = 1 + rb_format_key_number(step + 1, sizeof step - 2, i);
    step[n++] = ']';
    path_prepend(p, step, n);
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

/* A string key as ["..."], at most about 40 bytes of it. Bytes that are
 * not printable UTF-8 become \xNN: the path ends up in an error message,
 * which must itself be valid text to travel as JSON. */
static size_t quote_key(char *out, const unsigned char *s, size_t len) {
    static const char hex[] = "0123456789abcdef";
    size_t o = 0, i = 0;
    out[o++] = '[';
    out[o++] = '"';
    while (i < len && o < 44) {
        unsigned long cp = 0;
        size_t n = s[i] >= 0x80 ? rb_utf8_sequence(s + i, len - i, &cp) : 1;
        if (n > 1 && !(cp >= 0xD800 && cp <= 0xDFFF)) {
            memcpy(out + o, s + i, n);
            o += n;
        } else if (n == 1 && s[i] >= 0x20 && s[i] < 0x7F && s[i] != '"' && s[i] != '\\') {
            out[o++] = (char)s[i];
        } else {
            n = 1;
            out[o++] = '\\';
            out[o++] = 'x';
            out[o++] = hex[s[i] >> 4];
            out[o++] = hex[s[i] & 15];
        }
        i += n;
    }
    if (i < len) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o++] = '"';
    out[o++] = ']';
    return o;
}

void rb_path_key(rb_path *p, lua_State *L, int idx) {
    char step[64];
    size_t n;
    uint64_t bits;
    int kind;
    if (lua_type(L, idx) == LUA_TSTRING) {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        if (is_identifier(s, len)) {
            step[0] = '.';
            memcpy(step + 1, s, len);
            n = len + 1;
        } else {
            n = quote_key(step, (const unsigned char *)s, len);
        }
    } else if ((kind = rb_cdata_integer(L, idx, &bits)) != RB_NOT_INTEGER) {
        step[0] = '[';
        n = 1 +
            (kind == RB_INT64 ? rb_format_int64(step + 1, (int64_t)bits) : rb_format_uint64(step + 1, bits));
        step[n++] = ']';
    } else {
        rb_path_index(p, lua_tonumber(L, idx));
        return;
    }
    path_prepend(p, step, n);
}

void rb_format_failure(char *out, size_t size, const char *message, const rb_path *p, const char *root) {
    if (p->len || root)
        snprintf(out, size, "%s at %s%s%s", message, root ? root : "", p->text, p->cut ? "..." : "");
    else
        snprintf(out, size, "%s", message);
}

int rb_push_failure(lua_State *L, const char *message, const rb_path *p, const char *root) {
    char text[sizeof p->text + 200];
    rb_format_failure(text, sizeof text, message, p, root);
    lua_pushnil(L);
    lua_pushstring(L, text);
    return 2;
}

/* ---- the request ---- */

static int is_given(lua_State *L, int idx) {
    return idx != 0 && !lua_isnoneornil(L, idx);
}

/* The highest key of args, a table keyed 1..n with few holes. */
static int args_length(lua_State *L, int idx, int *n, char *err, size_t errlen) {
    double count, max;
    if (integer_keys(L, idx, &count, &max) < 0) {
        snprintf(err, errlen, "args must be an array (a table with keys 1..n)");
        return -1;
    }
    if (max - count > RB_MAX_ARG_HOLES) {
        snprintf(err, errlen, "args has %.0f holes before index %.0f: more than %d", max - count, max,
                 RB_MAX_ARG_HOLES);
        return -1;
    }
    *n = (int)max;
    return 0;
}

/* Whether kwargs has a key, all of them strings. */
static int kwargs_given(lua_State *L, int idx, int *any, char *err, size_t errlen) {
    *any = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) {
            lua_pop(L, 1);
            snprintf(err, errlen, "kwargs must be a table with string keys");
            return -1;
        }
        *any = 1;
    }
    return 0;
}

int rb_request_shape_of(lua_State *L, int args, int kwargs, rb_request_shape *out, char *err, size_t errlen) {
    out->nargs = 0;
    out->kwargs = 0;
    if (is_given(L, args)) {
        if (!lua_istable(L, args)) {
            snprintf(err, errlen, "args must be an array (table) or nil, got %s", luaL_typename(L, args));
            return -1;
        }
        if (args_length(L, args, &out->nargs, err, errlen) < 0) return -1;
    }
    if (is_given(L, kwargs)) {
        if (!lua_istable(L, kwargs)) {
            snprintf(err, errlen, "kwargs must be a table or nil, got %s", luaL_typename(L, kwargs));
            return -1;
        }
        if (kwargs_given(L, kwargs, &out->kwargs, err, errlen) < 0) return -1;
    }
    return 0;
}

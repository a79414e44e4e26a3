/* msgpack for Lua values, RabiBridge's default serialiser, with Debian's
 * msgpack-c writing the byte format. The shapes follow the JSON codec:
 * tables marked with the array metatable (and tables keyed 1..n) are
 * arrays, other tables maps, empty unmarked tables empty maps; the null
 * sentinel and nil are nil; decoded arrays get the array metatable back.
 *
 * What a Python peer (msgpack.packb and unpackb at their defaults) needs:
 * a Lua string that is strict UTF-8 goes out as str and any other as bin,
 * since Python refuses a str with overlong forms or surrogates, and both
 * come back as Lua strings. Map keys are strings, numbers written as the
 * JSON codec writes them, since unpackb refuses integer keys. Integral
 * numbers up to 2^63 are integers, -0.0 a float; integers beyond 2^53
 * decode to int64_t or uint64_t cdata and integer cdata encode as integers.
 *
 * As in json.c, bad values and bad input come back as nil, message, and
 * the encoder's buffer belongs to a userdata, so a raised error cannot leak
 * it. */
#include <math.h>
#include <msgpack/pack.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "lauxlib.h"
#include "msgpack_lua.h"
#include "values.h"

#define BUF_UPV lua_upvalueindex(1)
#define ARRAY_MT_UPV lua_upvalueindex(2)

/* ---- encoding ---- */

typedef struct {
    lua_State *L;
    int array_mt; /* the stack index of the array metatable */
    msgpack_packer pk;
    char message[160]; /* empty when a failure is out of memory */
    rb_path path;
} packer;

static int write_out(void *data, const char *buf, size_t len) {
    rb_outbuf *b = data;
    if (rb_outbuf_reserve(b, len) < 0) return -1;
    memcpy(b->data + b->len, buf, len);
    b->len += len;
    return 0;
}

static int pack_fail(packer *p, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->message, sizeof p->message, fmt, ap);
    va_end(ap);
    return -1;
}

static int pack_number(msgpack_packer *pk, double d) {
    if (d >= -RB_TWO_POW_63 && d < RB_TWO_POW_63 && d == floor(d) && !(d == 0 && signbit(d)))
        return msgpack_pack_int64(pk, (int64_t)d);
    if (d == RB_TWO_POW_63) return msgpack_pack_uint64(pk, (uint64_t)1 << 63);
    return msgpack_pack_double(pk, d); /* a fraction, -0.0, NaN, the infinities, 2^63 up */
}

static int pack_string(msgpack_packer *pk, const char *s, size_t len) {
    if (rb_utf8_invalid_at((const unsigned char *)s, len) == len)
        return msgpack_pack_str(pk, len) || msgpack_pack_str_body(pk, s, len);
    return msgpack_pack_bin(pk, len) || msgpack_pack_bin_body(pk, s, len);
}

/* -> 1 if idx held an integer cdata (packed, or failed to), 0 if not. */
static int pack_cdata_integer(packer *p, int idx, int *rc) {
    uint64_t bits;
    switch (rb_cdata_integer(p->L, idx, &bits)) {
    case RB_INT64: *rc = msgpack_pack_int64(&p->pk, (int64_t)bits); return 1;
    case RB_UINT64: *rc = msgpack_pack_uint64(&p->pk, bits); return 1;
    default: return 0;
    }
}

/* Keys go as strings, numbers as the JSON codec writes them. */
static int pack_key(packer *p, int idx) {
    lua_State *L = p->L;
    char text[40];
    size_t n;
    uint64_t bits;
    switch (lua_type(L, idx)) {
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return pack_string(&p->pk, s, len);
    }
    case LUA_TNUMBER: n = rb_format_key_number(text, sizeof text, lua_tonumber(L, idx)); break;
    default:
        switch (rb_cdata_integer(L, idx, &bits)) {
        case RB_INT64: n = rb_format_int64(text, (int64_t)bits); break;
        case RB_UINT64: n = rb_format_uint64(text, bits); break;
        default: return pack_fail(p, "cannot serialise a table key of type %s", luaL_typename(L, idx));
        }
    }
    return msgpack_pack_str(&p->pk, n) || msgpack_pack_str_body(&p->pk, text, n);
}

static int pack_value(packer *p, int idx, int depth);

static int pack_map(packer *p, int idx, int depth) {
    lua_State *L = p->L;
    size_t count = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        count++;
    }
    if (msgpack_pack_map(&p->pk, count) < 0) return -1;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        int top = lua_gettop(L);
        if (pack_key(p, top - 1) < 0) return -1; /* the caller discards the stack */
        if (pack_value(p, top, depth) < 0) {
            rb_path_key(&p->path, L, top - 1);
            return -1;
        }
        lua_pop(L, 1);
    }
    return 0;
}

/* Elements 1..n of the table at idx, nil as nil. */
static int pack_elements(packer *p, int idx, double n, int depth) {
    lua_State *L = p->L;
    if (msgpack_pack_array(&p->pk, (size_t)n) < 0) return -1;
    for (double i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, (int)i);
        if (pack_value(p, lua_gettop(L), depth) < 0) {
            rb_path_index(&p->path, i);
            return -1;
        }
        lua_pop(L, 1);
    }
    return 0;
}

static int pack_table(packer *p, int idx, int depth) {
    lua_State *L = p->L;
    if (depth > RB_MAX_DEPTH) return pack_fail(p, "nesting deeper than %d (a cycle?)", RB_MAX_DEPTH);
    if (!lua_checkstack(L, 6)) return pack_fail(p, "Lua stack exhausted");
    double n = rb_array_length(L, idx, p->array_mt);
    if (n > (double)UINT32_MAX) return pack_fail(p, "array too long");
    return n < 0 ? pack_map(p, idx, depth) : pack_elements(p, idx, n, depth);
}

static int pack_value(packer *p, int idx, int depth) {
    lua_State *L = p->L;
    int rc;
    switch (lua_type(L, idx)) {
    case LUA_TNIL: return msgpack_pack_nil(&p->pk);
    case LUA_TBOOLEAN: return lua_toboolean(L, idx) ? msgpack_pack_true(&p->pk) : msgpack_pack_false(&p->pk);
    case LUA_TNUMBER: return pack_number(&p->pk, lua_tonumber(L, idx));
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return pack_string(&p->pk, s, len);
    }
    case LUA_TTABLE: return pack_table(p, idx, depth + 1);
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) return msgpack_pack_nil(&p->pk);
        break;
    case RB_TCDATA:
        if (pack_cdata_integer(p, idx, &rc)) return rc;
        break;
    default: break;
    }
    return pack_fail(p, "cannot serialise a value of type %s", luaL_typename(L, idx));
}

/* core.msgpack_encode(value [, name]) -> string | nil, message. name, such
 * as "args", starts the path that a failure names. */
static int api_encode(lua_State *L) {
    luaL_checkany(L, 1);
    lua_settop(L, 2);
    const char *root = lua_tostring(L, 2);
    rb_outbuf *b = rb_outbuf_take(L, BUF_UPV);
    packer p = {.L = L, .array_mt = ARRAY_MT_UPV};
    msgpack_packer_init(&p.pk, b, write_out);
    int rc = pack_value(&p, 1, 0);
    if (rc == 0) lua_pushlstring(L, b->data ? b->data : "", b->len);
    rb_outbuf_done(b);
    if (rc == 0) return 1;
    if (!p.message[0]) return luaL_error(L, "msgpack_encode: not enough memory");
    return rb_push_failure(L, p.message, &p.path, root);
}

/* core.msgpack_result(...) -> string | nil, message: the reply [0, result]
 * to a call whose handler returned ..., as serial's encode_result makes it
 * (nothing or nil: nil; several values: an array, nil as nil), written in
 * one pass. A failure names its path from "result". */
static int api_result(lua_State *L) {
    int n = lua_gettop(L);
    rb_outbuf *b = rb_outbuf_take(L, BUF_UPV);
    packer p = {.L = L, .array_mt = ARRAY_MT_UPV};
    msgpack_packer_init(&p.pk, b, write_out);
    int rc = msgpack_pack_array(&p.pk, 2) || msgpack_pack_int64(&p.pk, 0) ? -1 : 0;
    if (rc == 0 && n == 0) {
        rc = msgpack_pack_nil(&p.pk);
    } else if (rc == 0 && n == 1) {
        rc = pack_value(&p, 1, 0);
    } else if (rc == 0) {
        /* As an array table of the values would go: one level deeper. */
        rc = !lua_checkstack(L, 6) ? pack_fail(&p, "Lua stack exhausted")
                                   : msgpack_pack_array(&p.pk, (size_t)n);
        for (int i = 1; rc == 0 && i <= n; i++) {
            if (pack_value(&p, i, 1) < 0) {
                rb_path_index(&p.path, i);
                rc = -1;
            }
        }
    }
    if (rc == 0) lua_pushlstring(L, b->data ? b->data : "", b->len);
    rb_outbuf_done(b);
    if (rc == 0) return 1;
    if (!p.message[0]) return luaL_error(L, "msgpack_result: not enough memory");
    return rb_push_failure(L, p.message, &p.path, "result");
}

/* The request [args, kwargs] in one pass: see rb_msgpack_write_request. */
static int write_request(packer *p, int args, int kwargs, const rb_request_shape *shape, const char **root) {
    *root = "args";
    if (!lua_checkstack(p->L, 6)) return pack_fail(p, "Lua stack exhausted");
    if (msgpack_pack_array(&p->pk, 2) < 0 || pack_elements(p, args, shape->nargs, 1) < 0) return -1;
    *root = "kwargs";
    return shape->kwargs ? pack_map(p, kwargs, 1) : msgpack_pack_map(&p->pk, 0);
}

int rb_msgpack_write_request(lua_State *L, int args, int kwargs, const rb_request_shape *shape, int array_mt,
                             rb_outbuf *b, char *err, size_t errlen) {
    packer p = {.L = L, .array_mt = array_mt};
    msgpack_packer_init(&p.pk, b, write_out);
    const char *root = NULL;
    int top = lua_gettop(L);
    int rc = write_request(&p, args, kwargs, shape, &root);
    lua_settop(L, top);
    if (rc == 0) return 0;
    if (!p.message[0]) return -2;
    rb_format_failure(err, errlen, p.message, &p.path, root);
    return -1;
}

/* core.msgpack_request(args, kwargs) -> string | nil, message: the
 * request [args, kwargs] as a client sends it (rb_msgpack_write_request). */
static int api_request(lua_State *L) {
    lua_settop(L, 2);
    rb_outbuf *b = rb_outbuf_take(L, BUF_UPV);
    char err[RB_REQUEST_ERROR_MAX];
    rb_request_shape shape;
    int rc = rb_request_shape_of(L, 1, 2, &shape, err, sizeof err);
    if (rc == 0) rc = rb_msgpack_write_request(L, 1, 2, &shape, ARRAY_MT_UPV, b, err, sizeof err);
    if (rc == 0) lua_pushlstring(L, b->data ? b->data : "", b->len);
    rb_outbuf_done(b);
    if (rc == -2) return luaL_error(L, "msgpack_request: not enough memory");
    if (rc == 0) return 1;
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
}

/* ---- decoding ----
 * Our own reader rather than msgpack_unpack_next: it builds Lua values
 * directly instead of an object tree first, and nests as deep as the JSON
 * codec (msgpack-c stops at 32 levels, which a Python peer may exceed). */

typedef struct {
    const unsigned char *p, *end;
    int array_mt; /* the stack index of the array metatable */
    char err[160];
} reader;

static int need(reader *r, size_t n) {
    if ((size_t)(r->end - r->p) < n) {
        snprintf(r->err, sizeof r->err, "truncated msgpack data");
        return -1;
    }
    return 0;
}

static uint64_t be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | p[i];
    return v;
}

static int read_uint(reader *r, int n, uint64_t *out) {
    if (need(r, (size_t)n) < 0) return -1;
    *out = be(r->p, n);
    r->p += n;
    return 0;
}

static int read_value(lua_State *L, reader *r, int depth);

static int read_bytes(lua_State *L, reader *r, uint64_t len) {
    if (need(r, len) < 0) return -1;
    lua_pushlstring(L, (const char *)r->p, (size_t)len);
    r->p += len;
    return 0;
}

static int read_array(lua_State *L, reader *r, uint64_t n, int depth) {
    /* Every element takes a byte at least: a count beyond what is left is a
     * lie, and must not size a table. */
    if (n > (uint64_t)(r->end - r->p)) return need(r, n);
    lua_createtable(L, (int)n, 0);
    for (uint64_t i = 0; i < n; i++) {
        if (read_value(L, r, depth + 1) < 0) return -1;
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_pushvalue(L, r->array_mt);
    lua_setmetatable(L, -2);
    return 0;
}

static int read_map(lua_State *L, reader *r, uint64_t n, int depth) {
    if (n > (uint64_t)(r->end - r->p) / 2) return need(r, 2 * n);
    lua_createtable(L, 0, (int)n);
    for (uint64_t i = 0; i < n; i++) {
        if (read_value(L, r, depth + 1) < 0) return -1;
        int kt = lua_type(L, -1);
        if (kt == LUA_TTABLE || kt == LUA_TLIGHTUSERDATA ||
            (kt == LUA_TNUMBER && lua_tonumber(L, -1) != lua_tonumber(L, -1))) {
            snprintf(r->err, sizeof r->err, "a map key of this type cannot be a Lua table key");
            return -1;
        }
        uint64_t bits;
        int kind = rb_cdata_integer(L, -1, &bits);
        if (kind != RB_NOT_INTEGER) {
            /* A cdata key would be a key by identity, which nothing can
             * look up: the 64-bit integer key becomes its decimal string. */
            char text[24];
            size_t len =
                kind == RB_INT64 ? rb_format_int64(text, (int64_t)bits) : rb_format_uint64(text, bits);
            lua_pop(L, 1);
            lua_pushlstring(L, text, len);
        }
        if (read_value(L, r, depth + 1) < 0) return -1;
        lua_rawset(L, -3);
    }
    return 0;
}

static int read_value(lua_State *L, reader *r, int depth) {
    if (depth > RB_MAX_DEPTH) {
        snprintf(r->err, sizeof r->err, "nesting deeper than %d", RB_MAX_DEPTH);
        return -1;
    }
    /* The value, and what making or reading a 64-bit integer takes. */
    if (!lua_checkstack(L, 6)) {
        snprintf(r->err, sizeof r->err, "nesting too deep for the Lua stack");
        return -1;
    }
    if (need(r, 1) < 0) return -1;
    unsigned c = *r->p++;
    uint64_t u;
    if (c <= 0x7f) {
        lua_pushnumber(L, c);
        return 0;
    }
    if (c >= 0xe0) {
        lua_pushnumber(L, (int)c - 256);
        return 0;
    }
    if (c >= 0x80 && c <= 0x8f) return read_map(L, r, c & 0x0f, depth);
    if (c >= 0x90 && c <= 0x9f) return read_array(L, r, c & 0x0f, depth);
    if (c >= 0xa0 && c <= 0xbf) return read_bytes(L, r, c & 0x1f);
    switch (c) {
    case 0xc0: lua_pushlightuserdata(L, NULL); return 0;
    case 0xc2: lua_pushboolean(L, 0); return 0;
    case 0xc3: lua_pushboolean(L, 1); return 0;
    case 0xc4:
    case 0xd9: /* bin 8, str 8 */ return read_uint(r, 1, &u) < 0 ? -1 : read_bytes(L, r, u);
    case 0xc5:
    case 0xda: return read_uint(r, 2, &u) < 0 ? -1 : read_bytes(L, r, u);
    case 0xc6:
    case 0xdb: return read_uint(r, 4, &u) < 0 ? -1 : read_bytes(L, r, u);
    case 0xca: {
        if (read_uint(r, 4, &u) < 0) return -1;
        uint32_t bits = (uint32_t)u;
        float f;
        memcpy(&f, &bits, sizeof f);
        lua_pushnumber(L, f);
        return 0;
    }
    case 0xcb: {
        if (read_uint(r, 8, &u) < 0) return -1;
        double d;
        memcpy(&d, &u, sizeof d);
        lua_pushnumber(L, d);
        return 0;
    }
    case 0xcc:
    case 0xcd:
    case 0xce:
    case 0xcf:
        if (read_uint(r, 1 << (c - 0xcc), &u) < 0) return -1;
        rb_push_uint64(L, u);
        return 0;
    case 0xd0:
    case 0xd1:
    case 0xd2:
    case 0xd3: {
        int n = 1 << (c - 0xd0);
        if (read_uint(r, n, &u) < 0) return -1;
        int64_t v = n == 8 ? (int64_t)u : (int64_t)(u << (64 - 8 * n)) >> (64 - 8 * n);
        rb_push_int64(L, v);
        return 0;
    }
    case 0xdc: return read_uint(r, 2, &u) < 0 ? -1 : read_array(L, r, u, depth);
    case 0xdd: return read_uint(r, 4, &u) < 0 ? -1 : read_array(L, r, u, depth);
    case 0xde: return read_uint(r, 2, &u) < 0 ? -1 : read_map(L, r, u, depth);
    case 0xdf: return read_uint(r, 4, &u) < 0 ? -1 : read_map(L, r, u, depth);
    default: /* 0xc1 (never used) and the ext family */
        snprintf(r->err, sizeof r->err,
                 c == 0xc1 ? "malformed msgpack data (byte 0xc1)"
                           : "msgpack extension types are not supported");
        return -1;
    }
}

/* core.msgpack_decode(bytes) -> value | nil, message */
static int api_decode(lua_State *L) {
    size_t len;
    if (lua_type(L, 1) != LUA_TSTRING) {
        lua_pushnil(L);
        lua_pushstring(L, "msgpack_decode expects a string");
        return 2;
    }
    const char *data = lua_tolstring(L, 1, &len);
    reader r = {(const unsigned char *)data, (const unsigned char *)data + len, ARRAY_MT_UPV, ""};
    int top = lua_gettop(L);
    int rc = read_value(L, &r, 0);
    if (rc == 0 && r.p != r.end) {
        snprintf(r.err, sizeof r.err, "trailing bytes after the value");
        rc = -1;
    }
    if (rc == 0) return 1;
    lua_settop(L, top);
    lua_pushnil(L);
    lua_pushstring(L, r.err);
    return 2;
}

/* core.msgpack_call_args(body) -> true, args... | false. A request of the
 * plain shape, [[a1, ..., an], {}], its arguments decoded straight onto the
 * stack (a top-level nil as nil, as bind makes it): no table for the
 * request, its args or its kwargs. false for anything else (kwargs given,
 * args that are not an array, malformed data, too many arguments for the
 * stack): the caller decodes that with msgpack_decode, which judges it. */
static int api_call_args(lua_State *L) {
    if (lua_type(L, 1) != LUA_TSTRING) goto other;
    size_t len;
    const char *data = lua_tolstring(L, 1, &len);
    lua_settop(L, 1);
    lua_pushboolean(L, 1);
    reader r = {(const unsigned char *)data, (const unsigned char *)data + len, ARRAY_MT_UPV, ""};
    uint64_t n;
    if (r.p >= r.end || *r.p++ != 0x92 || r.p >= r.end) goto other;
    unsigned c = *r.p++;
    if (c >= 0x90 && c <= 0x9f) {
        n = c & 0x0f;
    } else if (c == 0xdc || c == 0xdd) {
        if (read_uint(&r, c == 0xdc ? 2 : 4, &n) < 0) goto other;
    } else {
        goto other;
    }
    if (n > (uint64_t)(r.end - r.p)) goto other; /* a count beyond what is left */
    for (uint64_t i = 0; i < n; i++) {
        if (!lua_checkstack(L, 8)) goto other;
        if (r.p < r.end && *r.p == 0xc0) {
            r.p++;
            lua_pushnil(L);
        } else if (read_value(L, &r, 2) < 0) {
            goto other;
        }
    }
    if (r.p >= r.end || *r.p++ != 0x80 || r.p != r.end) goto other; /* kwargs: {} and nothing after */
    return lua_gettop(L) - 1;
other:
    lua_settop(L, 0);
    lua_pushboolean(L, 0);
    return 1;
}

int rb_msgpack_push_reply(lua_State *L, const char *s, size_t len, int array_mt) {
    int top = lua_gettop(L);
    reader r = {(const unsigned char *)s, (const unsigned char *)s + len, array_mt, ""};
    if (len < 3 || r.p[0] != 0x92 || r.p[1] > 1 || !lua_checkstack(L, 8)) return -1;
    lua_pushnumber(L, r.p[1]);
    r.p += 2;
    if (read_value(L, &r, 1) < 0 || r.p != r.end) {
        lua_settop(L, top);
        return -1;
    }
    return 0;
}

/* core.msgpack_reply(body) -> 0 | 1, result | false. A reply of the plain
 * shape [0, result] or [1, error] (0x92, 0x00 or 0x01, the value, nothing
 * after) decoded with no table around it; false for anything else, which
 * the caller decodes with msgpack_decode. */
static int api_reply(lua_State *L) {
    size_t len;
    const char *s = lua_type(L, 1) == LUA_TSTRING ? lua_tolstring(L, 1, &len) : NULL;
    lua_settop(L, 1);
    if (s && rb_msgpack_push_reply(L, s, len, ARRAY_MT_UPV) == 0) return 2;
    lua_pushboolean(L, 0);
    return 1;
}

void rb_open_msgpack(lua_State *L) {
    rb_values_open(L);
    rb_outbuf_new(L);
    luaL_getmetatable(L, RB_ARRAY_MT); /* shared with json.c */
    lua_pushcclosure(L, api_encode, 2);
    lua_setfield(L, -2, "msgpack_encode");
    rb_outbuf_new(L);
    luaL_getmetatable(L, RB_ARRAY_MT);
    lua_pushcclosure(L, api_result, 2);
    lua_setfield(L, -2, "msgpack_result");
    rb_outbuf_new(L);
    luaL_getmetatable(L, RB_ARRAY_MT);
    lua_pushcclosure(L, api_request, 2);
    lua_setfield(L, -2, "msgpack_request");
    /* The decoder has no use for the buffer: nil fills its slot. */
    lua_pushnil(L);
    luaL_getmetatable(L, RB_ARRAY_MT);
    lua_pushcclosure(L, api_decode, 2);
    lua_setfield(L, -2, "msgpack_decode");
    lua_pushnil(L);
    luaL_getmetatable(L, RB_ARRAY_MT);
    lua_pushcclosure(L, api_call_args, 2);
    lua_setfield(L, -2, "msgpack_call_args");
    lua_pushnil(L);
    luaL_getmetatable(L, RB_ARRAY_MT);
    lua_pushcclosure(L, api_reply, 2);
    lua_setfield(L, -2, "msgpack_reply");
}

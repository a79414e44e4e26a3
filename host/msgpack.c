/* msgpack for Lua values, RabiBridge's default serialiser, with Debian's
 * msgpack-c doing the byte format. The shapes follow the JSON codec: tables
 * marked with the array metatable (and tables keyed 1..n) are arrays, other
 * tables maps, empty unmarked tables empty maps; the null sentinel and nil
 * are nil; decoded arrays get the array metatable back. A Lua string that is
 * valid UTF-8 goes out as str and any other as bin, so a Python peer sees
 * str for text and bytes for binary; both come back as Lua strings. */
#include <math.h>
#include <msgpack/pack.h>
#include <msgpack/sbuffer.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "msgpack.h"
#include "lauxlib.h"

#define ARRAY_MT "rabibridge.array_mt"
#define MAX_DEPTH 1000

typedef struct {
    char message[160];
} pack_error;

static int utf8_valid(const unsigned char *s, size_t len) {
    size_t i = 0;
    while (i < len) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!n || i + n > len) return 0;
        for (size_t j = 1; j < n; j++)
            if ((s[i + j] & 0xC0) != 0x80) return 0;
        i += n;
    }
    return 1;
}

/* -1: not an array; otherwise the length to pack (holes become nil). */
static long array_length(lua_State *L, int idx) {
    if (lua_getmetatable(L, idx)) {
        luaL_getmetatable(L, ARRAY_MT);
        int marked = lua_rawequal(L, -1, -2);
        lua_pop(L, 2);
        if (marked) return (long)lua_objlen(L, idx);
    }
    long count = 0;
    double max = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TNUMBER) {
            lua_pop(L, 1);
            return -1;
        }
        double k = lua_tonumber(L, -1);
        if (k < 1 || k != floor(k)) {
            lua_pop(L, 1);
            return -1;
        }
        if (k > max) max = k;
        count++;
    }
    if (count == 0) return -1; /* an empty unmarked table is a map */
    return max <= 2.0 * (double)count ? (long)max : -1;
}

static int pack_value(lua_State *L, msgpack_packer *pk, int idx, int depth, pack_error *err);

static int pack_number(msgpack_packer *pk, double d) {
    if (d == floor(d) && d >= -9223372036854775808.0 && d < 9223372036854775808.0)
        return msgpack_pack_int64(pk, (int64_t)d);
    return msgpack_pack_double(pk, d);
}

static int pack_string(msgpack_packer *pk, const char *s, size_t len) {
    if (utf8_valid((const unsigned char *)s, len))
        return msgpack_pack_str(pk, len) || msgpack_pack_str_body(pk, s, len);
    return msgpack_pack_bin(pk, len) || msgpack_pack_bin_body(pk, s, len);
}

static int pack_table(lua_State *L, msgpack_packer *pk, int idx, int depth, pack_error *err) {
    if (depth > MAX_DEPTH) {
        snprintf(err->message, sizeof err->message, "nesting deeper than %d (a cycle?)", MAX_DEPTH);
        return -1;
    }
    luaL_checkstack(L, 4, "msgpack: nesting too deep");
    long n = array_length(L, idx);
    if (n >= 0) {
        msgpack_pack_array(pk, (size_t)n);
        for (long i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, (int)i);
            int rc = pack_value(L, pk, lua_gettop(L), depth + 1, err);
            lua_pop(L, 1);
            if (rc < 0) return -1;
        }
        return 0;
    }
    size_t count = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        int kt = lua_type(L, -1);
        if (kt != LUA_TSTRING && kt != LUA_TNUMBER) {
            lua_pop(L, 1);
            snprintf(err->message, sizeof err->message, "cannot serialise a table key of type %s",
                     lua_typename(L, kt));
            return -1;
        }
        count++;
    }
    msgpack_pack_map(pk, count);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        int top = lua_gettop(L);
        if (pack_value(L, pk, top - 1, depth + 1, err) < 0 || pack_value(L, pk, top, depth + 1, err) < 0) {
            lua_pop(L, 2);
            return -1;
        }
        lua_pop(L, 1);
    }
    return 0;
}

static int pack_value(lua_State *L, msgpack_packer *pk, int idx, int depth, pack_error *err) {
    switch (lua_type(L, idx)) {
    case LUA_TNIL: return msgpack_pack_nil(pk);
    case LUA_TBOOLEAN: return lua_toboolean(L, idx) ? msgpack_pack_true(pk) : msgpack_pack_false(pk);
    case LUA_TNUMBER: return pack_number(pk, lua_tonumber(L, idx));
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return pack_string(pk, s, len);
    }
    case LUA_TTABLE: return pack_table(L, pk, idx, depth, err);
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) return msgpack_pack_nil(pk);
        /* fall through */
    default:
        snprintf(err->message, sizeof err->message, "cannot serialise a value of type %s",
                 luaL_typename(L, idx));
        return -1;
    }
}

/* core.msgpack_encode(value) -> string | nil, message */
static int api_encode(lua_State *L) {
    luaL_checkany(L, 1);
    lua_settop(L, 1);
    msgpack_sbuffer buf;
    msgpack_sbuffer_init(&buf);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &buf, msgpack_sbuffer_write);
    pack_error err = {{0}};
    int rc = pack_value(L, &pk, 1, 0, &err);
    if (rc == 0) lua_pushlstring(L, buf.data ? buf.data : "", buf.size);
    msgpack_sbuffer_destroy(&buf);
    if (rc == 0) return 1;
    lua_pushnil(L);
    lua_pushstring(L, err.message[0] ? err.message : "out of memory");
    return 2;
}

/* ---- decoding ----
 * Our own reader rather than msgpack_unpack_next: it builds Lua values
 * directly instead of an object tree first, and nests as deep as the JSON
 * codec (msgpack-c stops at 32 levels, which a Python peer may exceed). */

typedef struct {
    const unsigned char *p, *end;
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
    luaL_getmetatable(L, ARRAY_MT);
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
        if (read_value(L, r, depth + 1) < 0) return -1;
        lua_rawset(L, -3);
    }
    return 0;
}

static int read_value(lua_State *L, reader *r, int depth) {
    if (depth > MAX_DEPTH) {
        snprintf(r->err, sizeof r->err, "nesting deeper than %d", MAX_DEPTH);
        return -1;
    }
    if (!lua_checkstack(L, 4)) {
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
        lua_pushnumber(L, (lua_Number)u);
        return 0;
    case 0xd0:
    case 0xd1:
    case 0xd2:
    case 0xd3: {
        int n = 1 << (c - 0xd0);
        if (read_uint(r, n, &u) < 0) return -1;
        int64_t v = n == 8 ? (int64_t)u : (int64_t)(u << (64 - 8 * n)) >> (64 - 8 * n);
        lua_pushnumber(L, (lua_Number)v);
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
    reader r = {(const unsigned char *)data, (const unsigned char *)data + len, ""};
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

void rb_open_msgpack(lua_State *L) {
    luaL_newmetatable(L, ARRAY_MT); /* shared with the JSON codec, whichever opens first */
    lua_pop(L, 1);
    lua_pushcfunction(L, api_encode);
    lua_setfield(L, -2, "msgpack_encode");
    lua_pushcfunction(L, api_decode);
    lua_setfield(L, -2, "msgpack_decode");
}

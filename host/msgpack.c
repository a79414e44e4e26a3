/* msgpack for Lua values, RabiBridge's default serialiser, with Debian's
 * msgpack-c doing the byte format. The shapes follow the JSON codec: tables
 * marked with the array metatable (and tables keyed 1..n) are arrays, other
 * tables maps, empty unmarked tables empty maps; the null sentinel and nil
 * are nil; decoded arrays get the array metatable back. A Lua string that is
 * valid UTF-8 goes out as str and any other as bin, so a Python peer sees
 * str for text and bytes for binary; both come back as Lua strings. */
#include <math.h>
#include <msgpack.h>
#include <stdio.h>
#include <string.h>

#include "core.h"
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
    case LUA_TNIL:
        return msgpack_pack_nil(pk);
    case LUA_TBOOLEAN:
        return lua_toboolean(L, idx) ? msgpack_pack_true(pk) : msgpack_pack_false(pk);
    case LUA_TNUMBER:
        return pack_number(pk, lua_tonumber(L, idx));
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return pack_string(pk, s, len);
    }
    case LUA_TTABLE:
        return pack_table(L, pk, idx, depth, err);
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

static int push_object(lua_State *L, const msgpack_object *o, char *err, size_t errlen);

static int push_container(lua_State *L, const msgpack_object *o, char *err, size_t errlen) {
    luaL_checkstack(L, 4, "msgpack: nesting too deep");
    if (o->type == MSGPACK_OBJECT_ARRAY) {
        uint32_t n = o->via.array.size;
        lua_createtable(L, (int)n, 0);
        for (uint32_t i = 0; i < n; i++) {
            if (push_object(L, &o->via.array.ptr[i], err, errlen) < 0) return -1;
            lua_rawseti(L, -2, (int)i + 1);
        }
        luaL_getmetatable(L, ARRAY_MT);
        lua_setmetatable(L, -2);
        return 0;
    }
    uint32_t n = o->via.map.size;
    lua_createtable(L, 0, (int)n);
    for (uint32_t i = 0; i < n; i++) {
        const msgpack_object_kv *kv = &o->via.map.ptr[i];
        if (kv->key.type == MSGPACK_OBJECT_NIL || kv->key.type == MSGPACK_OBJECT_ARRAY ||
            kv->key.type == MSGPACK_OBJECT_MAP) {
            snprintf(err, errlen, "a map key of this type cannot be a Lua table key");
            return -1;
        }
        if (push_object(L, &kv->key, err, errlen) < 0 || push_object(L, &kv->val, err, errlen) < 0) return -1;
        lua_rawset(L, -3);
    }
    return 0;
}

static int push_object(lua_State *L, const msgpack_object *o, char *err, size_t errlen) {
    switch (o->type) {
    case MSGPACK_OBJECT_NIL:
        lua_pushlightuserdata(L, NULL);
        return 0;
    case MSGPACK_OBJECT_BOOLEAN:
        lua_pushboolean(L, o->via.boolean);
        return 0;
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        lua_pushnumber(L, (lua_Number)o->via.u64);
        return 0;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        lua_pushnumber(L, (lua_Number)o->via.i64);
        return 0;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        lua_pushnumber(L, o->via.f64);
        return 0;
    case MSGPACK_OBJECT_STR:
        lua_pushlstring(L, o->via.str.ptr, o->via.str.size);
        return 0;
    case MSGPACK_OBJECT_BIN:
        lua_pushlstring(L, o->via.bin.ptr, o->via.bin.size);
        return 0;
    case MSGPACK_OBJECT_ARRAY:
    case MSGPACK_OBJECT_MAP:
        return push_container(L, o, err, errlen);
    default:
        snprintf(err, errlen, "msgpack extension types are not supported");
        return -1;
    }
}

/* core.msgpack_decode(bytes) -> value | nil, message */
static int api_decode(lua_State *L) {
    size_t len;
    const char *data = luaL_checklstring(L, 1, &len);
    msgpack_unpacked result;
    msgpack_unpacked_init(&result);
    size_t off = 0;
    char err[160] = "";
    msgpack_unpack_return ret = msgpack_unpack_next(&result, data, len, &off);
    int top = lua_gettop(L);
    int rc = -1;
    if (ret == MSGPACK_UNPACK_SUCCESS && off != len) snprintf(err, sizeof err, "trailing bytes after the value");
    else if (ret == MSGPACK_UNPACK_CONTINUE) snprintf(err, sizeof err, "truncated msgpack data");
    else if (ret == MSGPACK_UNPACK_NOMEM_ERROR) snprintf(err, sizeof err, "out of memory (or nesting too deep)");
    else if (ret != MSGPACK_UNPACK_SUCCESS) snprintf(err, sizeof err, "malformed msgpack data (or nested deeper than msgpack-c's limit of 32)");
    else rc = push_object(L, &result.data, err, sizeof err);
    msgpack_unpacked_destroy(&result);
    if (rc == 0) return 1;
    lua_settop(L, top);
    lua_pushnil(L);
    lua_pushstring(L, err);
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

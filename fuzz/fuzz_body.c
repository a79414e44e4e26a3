/* libFuzzer target for everything a message body goes through before a
 * handler sees it: the zstd layer (bounded by max_body), then the json and
 * msgpack decoders, then the request shape check of serial.lua. Any crash,
 * sanitizer report or leak is a bug: the host must survive any body. */
#include <stddef.h>
#include <stdint.h>

#include "codec.h"
#include "json.h"
#include "lauxlib.h"
#include "lualib.h"
#include "msgpack_lua.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The codecs alone, as rabibridge.core opens them: no loop, no broker. */
static lua_State *state(void) {
    static lua_State *L; /* one state for the whole run, as in a worker */
    if (L) return L;
    L = luaL_newstate();
    luaL_openlibs(L);
    lua_newtable(L);
    rb_open_json(L);
    rb_open_msgpack(L);
    lua_setglobal(L, "core");
    return L;
}

/* Calls core.NAME(body); the decoders must return, never raise. */
static void decode_with(lua_State *L, const char *name, const char *body, size_t len) {
    lua_getglobal(L, "core");
    lua_getfield(L, -1, name);
    lua_pushlstring(L, body, len);
    if (lua_pcall(L, 1, 2, 0) != 0) __builtin_trap();
    lua_settop(L, 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    lua_State *L = state();
    rb_buf plain = {0};
    const char *body = (const char *)data;
    size_t len = size;
    if (rb_body_is_compressed(data, size)) {
        const char *err = NULL;
        if (rb_body_decompress(data, size, 1u << 20, &plain, &err) == 0) {
            body = plain.data;
            len = plain.len;
        }
    }
    decode_with(L, "json_decode", body, len);
    decode_with(L, "msgpack_decode", body, len);
    rb_buf_free(&plain);
    lua_gc(L, LUA_GCSTEP, 0);
    return 0;
}

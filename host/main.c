/* rabihost: a LuaJIT state with rabibridge.core linked in and the Lua half of
 * rabibridge embedded, handing the command line to rabibridge.cli. Embedding
 * the Lua modules means the binary runs from anywhere without a LUA_PATH. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

#include "lauxlib.h"
#include "lua.h"
#include "lualib.h"

int luaopen_rabibridge_core(lua_State *L);

typedef struct {
    const char *name, *chunkname;
    const char *source;
    size_t len;
} embedded_module;

extern const embedded_module rb_embedded_modules[];

static int load_embedded(lua_State *L) {
    const embedded_module *m = &rb_embedded_modules[lua_tointeger(L, lua_upvalueindex(1))];
    if (luaL_loadbuffer(L, m->source, m->len, m->chunkname) != 0) return lua_error(L);
    lua_pushstring(L, m->name);
    lua_call(L, 1, 1);
    return 1;
}

static int boot(lua_State *L) {
    int argc = (int)lua_tointeger(L, 1);
    char **argv = lua_touserdata(L, 2);
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_rabibridge_core);
    lua_setfield(L, -2, "rabibridge.core");
    for (int i = 0; rb_embedded_modules[i].name; i++) {
        lua_pushinteger(L, i);
        lua_pushcclosure(L, load_embedded, 1);
        lua_setfield(L, -2, rb_embedded_modules[i].name);
    }
    lua_getglobal(L, "require");
    lua_pushstring(L, "rabibridge.cli");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "main");
    lua_createtable(L, argc, 1);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i);
    }
    lua_call(L, 1, 1);
    return 1;
}

int main(int argc, char **argv) {
    /* A write to a broker that went away must be an error, not a death. */
    signal(SIGPIPE, SIG_IGN);
    lua_State *L = luaL_newstate();
    if (!L) {
        fprintf(stderr, "rabihost: cannot create a Lua state\n");
        return 70;
    }
    lua_pushcfunction(L, boot);
    lua_pushinteger(L, argc);
    lua_pushlightuserdata(L, argv);
    int code;
    if (lua_pcall(L, 2, 1, 0) != 0) {
        fprintf(stderr, "rabihost: %s\n", lua_tostring(L, -1));
        code = 70;
    } else {
        code = (int)luaL_optinteger(L, -1, 0);
    }
    /* Closing runs the finalizers: links close politely and leak checkers
     * see every block returned. */
    lua_close(L);
    fflush(NULL);
    return code;
}

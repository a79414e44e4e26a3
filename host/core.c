/* luaopen_rabibridge_core: the module table, the per-process state, the
 * logger, and running the loop from Lua. */
#include "core.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <zstd.h>

#include "json.h"
#include "lauxlib.h"
#include "task.h"

rb_process rb_proc = {.log_level = RB_LOG_INFO, .worker_id = -1, .ready_fd = -1};

static const char *const level_names[] = {"DEBUG", "INFO", "WARN", "ERROR", "OFF", NULL};

rb_loop *rb_get_loop(void) {
    if (!rb_proc.loop) rb_proc.loop = rb_loop_new();
    return rb_proc.loop;
}

void rb_log(int level, const char *fmt, ...) {
    if (level < rb_proc.log_level) return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    char stamp[32];
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    char who[32];
    if (rb_proc.worker_id >= 0)
        snprintf(who, sizeof who, "%d w%d", (int)getpid(), rb_proc.worker_id);
    else
        snprintf(who, sizeof who, "%d", (int)getpid());
    /* One event, one line: a traceback's lines are joined with " | ". */
    for (char *p = msg; *p; p++) {
        if (*p == '\n')
            *p = '|';
        else if (*p == '\t')
            *p = ' ';
    }
    /* One write per line so that lines of several workers never interleave. */
    fprintf(stderr, "%s.%03dZ %-5s [%s] %s\n", stamp, (int)(tv.tv_usec / 1000), level_names[level], who, msg);
}

static int api_log(lua_State *L) {
    int level = luaL_checkoption(L, 1, NULL, level_names);
    const char *msg = luaL_checkstring(L, 2);
    rb_log(level, "%s", msg);
    return 0;
}

static int api_set_log_level(lua_State *L) {
    rb_proc.log_level = luaL_checkoption(L, 1, NULL, level_names);
    return 0;
}

static int api_log_enabled(lua_State *L) {
    lua_pushboolean(L, luaL_checkoption(L, 1, NULL, level_names) >= rb_proc.log_level);
    return 1;
}

void rb_register_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc) {
    if (luaL_newmetatable(L, name)) {
        lua_newtable(L);
        luaL_register(L, NULL, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
}

/* core.run(): serve until a signal or a lost link stops the worker.
 * Returns "signal" or "lost". */
static int api_run(lua_State *L) {
    rb_loop *loop = rb_get_loop();
    while (!rb_proc.stopping) rb_loop_run_once(loop, 1000);
    lua_pushstring(L, rb_proc.stopping == 2 ? "lost" : "signal");
    return 1;
}

/* core.run_once(timeout_s): one loop iteration, for draining. */
static int api_run_once(lua_State *L) {
    double t = luaL_optnumber(L, 1, 0);
    lua_pushinteger(L, rb_loop_run_once(rb_get_loop(), (int)(t * 1000)));
    return 1;
}

/* core.clear_lost(): back to serving after a reconnection (a stop request
 * that came meanwhile wins). */
static int api_clear_lost(lua_State *L) {
    (void)L;
    if (rb_proc.stopping == 2) rb_proc.stopping = 0;
    return 0;
}

/* core.abandon(): this worker exits with calls still in flight (a drain
 * that timed out). Their coroutines, timers and buffers go with the
 * process: closing the Lua state would only pretend to finish them. */
static int api_abandon(lua_State *L) {
    (void)L;
    rb_proc.abandoned = 1;
    return 0;
}

static int api_stopping(lua_State *L) {
    lua_pushinteger(L, rb_proc.stopping);
    return 1;
}

static int api_process_info(lua_State *L) {
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, getpid());
    lua_setfield(L, -2, "pid");
    lua_pushinteger(L, rb_proc.worker_id);
    lua_setfield(L, -2, "worker");
    lua_pushinteger(L, sysconf(_SC_NPROCESSORS_ONLN));
    lua_setfield(L, -2, "cpus");
    return 1;
}

static int api_in_task(lua_State *L) {
    lua_pushboolean(L, rb_task_current(L) != NULL);
    return 1;
}

/* Frees what the process state owns when the Lua state closes (plain
 * luajit exiting), so that leak checkers see a clean exit. */
static int process_gc(lua_State *L) {
    (void)L;
    rb_loop_free(rb_proc.loop);
    rb_proc.loop = NULL;
    ZSTD_freeCCtx(rb_proc.zstd_cctx);
    ZSTD_freeDCtx(rb_proc.zstd_dctx);
    rb_proc.zstd_cctx = rb_proc.zstd_dctx = NULL;
    rb_proc.L = NULL;
    return 0;
}

int luaopen_rabibridge_core(lua_State *L) {
    static const luaL_Reg funcs[] = {{"log", api_log},
                                     {"set_log_level", api_set_log_level},
                                     {"log_enabled", api_log_enabled},
                                     {"run", api_run},
                                     {"run_once", api_run_once},
                                     {"stopping", api_stopping},
                                     {"clear_lost", api_clear_lost},
                                     {"abandon", api_abandon},
                                     {"process_info", api_process_info},
                                     {"in_task", api_in_task},
                                     {NULL, NULL}};
    /* One module per process: the loop and its hooks must not be set up twice. */
    lua_getfield(L, LUA_REGISTRYINDEX, "rabibridge.core");
    if (!lua_isnil(L, -1)) return 1;
    lua_pop(L, 1);
    int ismain = lua_pushthread(L);
    lua_pop(L, 1);
    if (!ismain) return luaL_error(L, "load rabibridge.core from the main thread, not a coroutine");
    rb_proc.L = L;
    if (!rb_get_loop()) return luaL_error(L, "cannot create the event loop");
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    /* What both codecs share: arrays carry this metatable, and JSON null /
     * msgpack nil is a NULL lightuserdata (the same value as cjson.null). */
    luaL_newmetatable(L, "rabibridge.array_mt");
    lua_setfield(L, -2, "array_mt");
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "null");
    rb_open_task(L);
    rb_open_sleep(L);
    rb_open_client(L);
    rb_open_server(L);
    rb_open_process(L);
    rb_open_crypto(L);
    rb_open_toml(L);
    rb_open_json(L);
    rb_open_msgpack(L);
    lua_pushstring(L, RB_VERSION);
    lua_setfield(L, -2, "version");
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, "rabibridge.core");
    lua_newuserdata(L, 1);
    lua_newtable(L);
    lua_pushcfunction(L, process_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_setfield(L, LUA_REGISTRYINDEX, "rabibridge.process");
    return 1;
}

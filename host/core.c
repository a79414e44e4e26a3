/* luaopen_rabibridge_core: registers the module, and nothing else. Each API
 * lives in its own file; this table says which. Every function gets the
 * scheduler as its first upvalue (bind.h's rb_sched_of), which is how a
 * binding finds the loop from the Lua state. The codecs (json, msgpack,
 * toml) and crypto open themselves, since their functions carry state of
 * their own as upvalues or live in C++. */
#include <stdlib.h>

#include "bind.h"
#include "client.h"
#include "codec.h"
#include "crypto.h"
#include "discovery.h"
#include "fs.h"
#include "gateway.h"
#include "interrupt.h"
#include "json.h"
#include "lineedit.h"
#include "log.h"
#include "metrics.h"
#include "msgpack_lua.h"
#include "server.h"
#include "sleep.h"
#include "supervisor.h"
#include "task.h"
#include "trace.h"
#include "wire.h"
#include "worker.h"

#define MODULE_KEY "rabibridge.core"
#define PROCESS_KEY "rabibridge.process"

static const luaL_Reg module_functions[] = {
    /* log.c */
    {"log", rb_api_log},
    {"set_log_level", rb_api_set_log_level},
    {"log_enabled", rb_api_log_enabled},
    {"set_log_format", rb_api_set_log_format},
    {"set_access_log", rb_api_set_access_log},
    /* trace.c */
    {"traceparent", rb_api_traceparent},
    /* task.c */
    {"spawn", rb_api_spawn},
    {"wait", rb_api_wait},
    {"in_task", rb_api_in_task},
    {"trace_current", rb_api_trace_current},
    {"trace_set", rb_api_trace_set},
    {"task_cid", rb_api_task_cid},
    {"co_resume", rb_api_co_resume},
    {"co_status", rb_api_co_status},
    /* sleep.c */
    {"sleep", rb_api_sleep},
    {"now", rb_api_now},
    /* client.c */
    {"client_open", rb_api_client_open},
    {"client_request", rb_api_client_request},
    /* server.c */
    {"server_open", rb_api_server_open},
    /* worker.c */
    {"worker_serve", rb_api_worker_serve},
    {"process_info", rb_api_process_info},
    /* supervisor.c */
    {"supervise", rb_api_supervise},
    /* metrics.c */
    {"metrics_client_call", rb_api_metrics_client_call},
    /* lineedit.c */
    {"readline", rb_api_readline},
    {"history_file", rb_api_history_file},
    {"interactive", rb_api_interactive},
    /* interrupt.c */
    {"catch_interrupts", rb_api_catch_interrupts},
    {"interrupt_task", rb_api_interrupt_task},
    /* fs.c */
    {"list_dir", rb_api_list_dir},
    /* discovery.c */
    {"discovery_open", rb_api_discovery_open},
    {"hostname", rb_api_hostname},
    /* gateway.c */
    {"http_listen_socket", rb_api_http_listen_socket},
    {"http_serve", rb_api_http_serve},
    {NULL, NULL}};

/* What the module owns for the process: the loop and the scheduler. */
typedef struct {
    rb_loop *loop;
    rb_sched *sched;
} process_state;

/* Frees what the process owns when the Lua state closes (plain luajit
 * exiting, a worker closing its copy), so that leak checkers see a clean
 * exit. */
static int process_gc(lua_State *L) {
    process_state *ps = lua_touserdata(L, 1);
    rb_sched_free(ps->sched);
    rb_loop_free(ps->loop);
    ps->sched = NULL;
    ps->loop = NULL;
    rb_codec_free();
    return 0;
}

static process_state *new_process_state(lua_State *L) {
    process_state *ps = lua_newuserdata(L, sizeof *ps);
    ps->loop = rb_loop_new();
    ps->sched = ps->loop ? rb_sched_new(L, ps->loop) : NULL;
    lua_newtable(L);
    lua_pushcfunction(L, process_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_setfield(L, LUA_REGISTRYINDEX, PROCESS_KEY);
    if (!ps->sched) luaL_error(L, "rabibridge.core: cannot create the event loop");
    return ps;
}

static void set_wire_names(lua_State *L) {
    lua_createtable(L, 0, 4);
    lua_pushstring(L, RB_RPC_EXCHANGE);
    lua_setfield(L, -2, "exchange");
    lua_pushstring(L, RB_QUEUE_PREFIX);
    lua_setfield(L, -2, "queue_prefix");
    lua_pushstring(L, RB_EXPIRED_QUEUE);
    lua_setfield(L, -2, "expired_queue");
    lua_pushstring(L, RB_DISCOVERY_KEY);
    lua_setfield(L, -2, "discovery_key");
    lua_setfield(L, -2, "wire");
}

int luaopen_rabibridge_core(lua_State *L) {
    /* One module per process: the loop and its hooks must not be set up twice. */
    lua_getfield(L, LUA_REGISTRYINDEX, MODULE_KEY);
    if (!lua_isnil(L, -1)) return 1;
    lua_pop(L, 1);
    int ismain = lua_pushthread(L);
    lua_pop(L, 1);
    if (!ismain) return luaL_error(L, "load rabibridge.core from the main thread, not a coroutine");
    rb_sched *s = new_process_state(L)->sched;

    lua_newtable(L);
    lua_pushlightuserdata(L, s);
    luaL_openlib(L, NULL, module_functions, 1);
    rb_register_class(L, s, RB_TASK_CLASS, rb_task_methods, rb_api_task_gc);
    rb_register_class(L, s, RB_CLIENT_CLASS, rb_client_methods, rb_api_client_gc);
    rb_register_class(L, s, RB_SERVER_CLASS, rb_server_methods, rb_api_server_gc);
    rb_register_class(L, s, RB_DISCOVERY_CLASS, rb_discovery_methods, rb_api_discovery_gc);
    rb_register_class(L, s, RB_GATEWAY_CLASS, rb_gateway_methods, rb_api_gateway_gc);
    /* Error values: lua/rabibridge/errors.lua gives them __index and __tostring. */
    luaL_newmetatable(L, RB_ERROR_MT);
    lua_setfield(L, -2, "error_mt");
    rb_open_json(L); /* also sets array_mt and null, which msgpack shares */
    rb_open_msgpack(L);
    rb_open_crypto(L);
    rb_open_toml(L);
    set_wire_names(L);
    lua_pushstring(L, RB_VERSION);
    lua_setfield(L, -2, "version");
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, MODULE_KEY);
    return 1;
}

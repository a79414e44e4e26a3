/* The Lua binding of the gateway's HTTP server (http.c's rb_http_serve):
 * each request a task running a Lua handler, answered when the task ends.
 * The routing, the JSON and the mapping of errors to statuses are Lua's
 * (lua/rabibridge/gateway.lua). */
#ifndef RB_GATEWAY_H
#define RB_GATEWAY_H

#include "lauxlib.h"

#define RB_GATEWAY_CLASS "rabibridge.http"

typedef struct rb_gateway rb_gateway;

/* The gateway at idx (raises if it is not one). */
rb_gateway *rb_gateway_check(lua_State *L, int idx);
/* Requests whose handler has not finished, and answers not yet all written. */
long rb_gateway_inflight(const rb_gateway *g);
/* Stops accepting connections: a drain. */
void rb_gateway_quiesce(rb_gateway *g);

/* core.http_listen_socket("HOST:PORT") -> fd, port | nil, err */
int rb_api_http_listen_socket(lua_State *L);
/* core.http_serve(opts, handler) -> gateway | nil, err */
int rb_api_http_serve(lua_State *L);
extern const luaL_Reg rb_gateway_methods[];
int rb_api_gateway_gc(lua_State *L);

#endif

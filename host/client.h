/* Lua API of the RPC client: core.client_open, core.client_request (a
 * call) and the client's methods. */
#ifndef RB_CLIENT_H
#define RB_CLIENT_H

#include "lauxlib.h"

#define RB_CLIENT_CLASS "rabibridge.client"

int rb_api_client_open(lua_State *L);
int rb_api_client_request(lua_State *L);
int rb_api_client_gc(lua_State *L);
extern const luaL_Reg rb_client_methods[];

#endif

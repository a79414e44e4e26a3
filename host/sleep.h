/* Lua API: core.sleep and core.now. */
#ifndef RB_SLEEP_H
#define RB_SLEEP_H

#include "lua.h"

int rb_api_sleep(lua_State *L);
int rb_api_now(lua_State *L);

#endif

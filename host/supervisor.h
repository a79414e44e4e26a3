/* Lua API of the supervisor: core.supervise. */
#ifndef RB_SUPERVISOR_H
#define RB_SUPERVISOR_H

#include "lua.h"

int rb_api_supervise(lua_State *L);

#endif

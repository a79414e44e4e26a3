/* Lua API of line editing: core.readline. */
#ifndef RB_LINEEDIT_H
#define RB_LINEEDIT_H

#include "lua.h"

int rb_api_readline(lua_State *L);

#endif

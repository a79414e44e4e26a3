/* Lua API of line editing: core.readline, core.history_file,
 * core.interactive. */
#ifndef RB_LINEEDIT_H
#define RB_LINEEDIT_H

#include "lua.h"

int rb_api_readline(lua_State *L);
int rb_api_history_file(lua_State *L);
int rb_api_interactive(lua_State *L);

#endif

/* Lua API of the file system: core.list_dir. */
#ifndef RB_FS_H
#define RB_FS_H

#include "lua.h"

int rb_api_list_dir(lua_State *L);

#endif

/* msgpack for RabiBridge's wire protocol (its default serialiser): see
 * msgpack.c. Named so as not to hide msgpack-c's own <msgpack.h>. */
#ifndef RB_MSGPACK_LUA_H
#define RB_MSGPACK_LUA_H

#include "lua.h"

/* Sets msgpack_encode and msgpack_decode in the module table on top of the
 * stack. */
void rb_open_msgpack(lua_State *L);

#endif

/* msgpack for RabiBridge's wire protocol: see msgpack.c. */
#ifndef RB_MSGPACK_H
#define RB_MSGPACK_H

#include "lua.h"

/* Sets msgpack_encode and msgpack_decode in the module table on top of the
 * stack (and makes the array metatable shared with the JSON codec). */
void rb_open_msgpack(lua_State *L);

#endif

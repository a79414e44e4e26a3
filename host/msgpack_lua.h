/* msgpack for RabiBridge's wire protocol (its default serialiser): see
 * msgpack.c. Named so as not to hide msgpack-c's own <msgpack.h>. */
#ifndef RB_MSGPACK_LUA_H
#define RB_MSGPACK_LUA_H

#include <stddef.h>

#include "lua.h"
#include "values.h"

/* As rb_json_write_request and rb_json_push_reply (json.h), in msgpack. */
int rb_msgpack_write_request(lua_State *L, int args, int kwargs, const rb_request_shape *shape, int array_mt,
                             rb_outbuf *b, char *err, size_t errlen);
int rb_msgpack_push_reply(lua_State *L, const char *s, size_t len, int array_mt);

/* Sets msgpack_encode and msgpack_decode in the module table on top of the
 * stack. */
void rb_open_msgpack(lua_State *L);

#endif

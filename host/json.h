/* JSON for RabiBridge's wire protocol, in C because lua-cjson 2.1.0 (Debian)
 * decodes [] and {} to the same empty table: see json.c. */
#ifndef RB_JSON_H
#define RB_JSON_H

#include <stddef.h>

#include "lua.h"
#include "values.h"

/* Writes the request [args, kwargs] to b, as a client sends it: args and
 * kwargs are the stack indices that rb_request_shape_of gave shape for,
 * array_mt that of the array metatable (an upvalue index will do). 0; -1
 * with the message in err (a bad value names its path, as "at
 * args[2].name"); -2 out of memory. */
int rb_json_write_request(lua_State *L, int args, int kwargs, const rb_request_shape *shape, int array_mt,
                          rb_outbuf *b, char *err, size_t errlen);
/* Pushes the code (0 or 1) and the result of a reply of the plain shape
 * [code, result] (s NUL-terminated, as Lua strings are); -1 with nothing
 * pushed for any other, which a full decode must judge. */
int rb_json_push_reply(lua_State *L, const char *s, size_t len, int array_mt);

/* Sets json_encode, json_decode, null and array_mt in the module table on
 * top of the stack. */
void rb_open_json(lua_State *L);

#endif

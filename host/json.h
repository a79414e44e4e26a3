/* JSON for RabiBridge's wire protocol, in C because lua-cjson 2.1.0 (Debian)
 * decodes [] and {} to the same empty table: see json.c. */
#ifndef RB_JSON_H
#define RB_JSON_H

#include "lua.h"

/* Sets json_encode, json_decode, null and array_mt in the module table on
 * top of the stack. */
void rb_open_json(lua_State *L);

#endif

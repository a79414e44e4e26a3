/* A worker's memory: its Lua heap against a bound, and the memory one large
 * call leaves behind given back once it is done. */
#ifndef RB_HEAP_H
#define RB_HEAP_H

#include <stddef.h>

#include "lua.h"

/* Bodies (a request, a reply) from this size up make a call large. */
#define RB_HEAP_LARGE_BODY ((size_t)1 << 20)

/* Whether the live Lua heap holds more than limit_mib: when the count
 * (garbage included) is past it, a full collection decides. *mib: the
 * heap's size in MiB. */
int rb_heap_over(lua_State *L, double limit_mib, double *mib);
/* A call moved a body of this many bytes; from RB_HEAP_LARGE_BODY up, the
 * next rb_heap_give_back returns what it took. */
void rb_heap_note_body(size_t bytes);
/* After a large call: a full collection (its strings are garbage, and
 * LuaJIT unmaps large blocks only when they are collected), the zstd
 * contexts (they keep tables sized for the largest body they saw), and
 * malloc's free pages. Cheap when there was none. */
void rb_heap_give_back(lua_State *L);

#endif

/* A worker's memory (heap.h). */
#include "heap.h"

#include <malloc.h>

#include "codec.h"

static int large_since; /* a large call since the last give-back */

static double heap_mib(lua_State *L) {
    return (double)lua_gc(L, LUA_GCCOUNT, 0) / 1024.0 + (double)lua_gc(L, LUA_GCCOUNTB, 0) / 1048576.0;
}

int rb_heap_over(lua_State *L, double limit_mib, double *mib) {
    *mib = heap_mib(L);
    if (*mib <= limit_mib) return 0;
    lua_gc(L, LUA_GCCOLLECT, 0);
    *mib = heap_mib(L);
    return *mib > limit_mib;
}

void rb_heap_note_body(size_t bytes) {
    if (bytes >= RB_HEAP_LARGE_BODY) large_since = 1;
}

void rb_heap_give_back(lua_State *L) {
    if (!large_since) return;
    large_since = 0;
    /* LuaJIT halves its string buffer once per cycle: a buffer a large
     * body grew takes a few cycles to come back down. */
    for (int i = 0; i < 4; i++) {
        double before = heap_mib(L);
        lua_gc(L, LUA_GCCOLLECT, 0);
        if (before - heap_mib(L) < 0.5) break;
    }
    rb_codec_free();
    malloc_trim(0);
}

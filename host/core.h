/* The one per-process state of rabibridge.core, and what every C file of the
 * core shares: logging, and the Lua state the loop resumes coroutines of. */
#ifndef RB_CORE_H
#define RB_CORE_H

#include <stddef.h>

#include "loop.h"
#include "lauxlib.h"
#include "lua.h"

enum { RB_LOG_DEBUG, RB_LOG_INFO, RB_LOG_WARN, RB_LOG_ERROR, RB_LOG_OFF };

struct rb_task;

typedef struct rb_process {
    lua_State *L;            /* the main state: coroutines are made from it */
    rb_loop *loop;           /* created on first use */
    struct rb_task *current; /* the managed task now running, if any */
    int log_level;
    int worker_id; /* -1 outside a worker */
    int ready_fd;  /* a worker's pipe to tell the supervisor it consumes */
    struct rb_task *ready_head, *ready_tail; /* tasks to resume before sleeping */
    void *zstd_cctx, *zstd_dctx;             /* reused by every body */
    struct {
        lua_State *co;
        int ref;
    } idle_threads[256]; /* finished coroutines to reuse */
    int nidle_threads;
    int blocked_woken;     /* a blocking (main-thread) wait was satisfied */
    volatile int stopping; /* set by SIGTERM/SIGINT in a worker */
    int abandoned;         /* a worker left calls unfinished: exit without closing Lua */
} rb_process;

extern rb_process rb_proc;

rb_loop *rb_get_loop(void);
void rb_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A userdata class: its metatable (methods as __index, and __gc), made once. */
void rb_register_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc);

/* Registration of each API area into the module table on top of the stack. */
void rb_open_task(lua_State *L);
void rb_open_sleep(lua_State *L);
void rb_open_client(lua_State *L);
void rb_open_server(lua_State *L);
void rb_open_process(lua_State *L);
void rb_open_crypto(lua_State *L);
void rb_open_toml(lua_State *L); /* host/toml.cc, C++ */
void rb_open_msgpack(lua_State *L);

/* Writes url (a broker URL, or several separated by spaces) into out with
 * whatever could be a password masked, however malformed the URL. */
void rb_mask_url(const char *url, char *out, size_t outlen);
#define RB_MASKED_MAX(len) (5 * (len) + 1)

#endif

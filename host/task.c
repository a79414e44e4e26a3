/* Tasks and waits: the yield-on-I/O machinery every waiting API uses.
 *
 * A woken task is not resumed from inside the event handler that woke it:
 * it goes on a ready queue that the loop drains before it sleeps. Handlers
 * (a frame parser, a timer) therefore never see Lua code run underneath them
 * and close the very link they are iterating. */
#include "task.h"

#include <stdlib.h>

#include "core.h"
#include "lauxlib.h"

#define TASK_HANDLE "rabibridge.task"

static void make_ready(rb_task *t) {
    t->next_ready = NULL;
    if (rb_proc.ready_tail)
        rb_proc.ready_tail->next_ready = t;
    else
        rb_proc.ready_head = t;
    rb_proc.ready_tail = t;
}

/* A coroutine whose body returned normally is as good as new (status 0,
 * nothing on its call stack): keeping a few saves a thread and a registry
 * reference per call. One that raised is dead and is let go. */
static void recycle_thread(rb_task *t) {
    if (t->finished && t->status == 0 && rb_proc.nidle_threads < 256) {
        lua_settop(t->co, 0);
        rb_proc.idle_threads[rb_proc.nidle_threads].co = t->co;
        rb_proc.idle_threads[rb_proc.nidle_threads++].ref = t->co_ref;
    } else {
        luaL_unref(rb_proc.L, LUA_REGISTRYINDEX, t->co_ref);
    }
}

void rb_task_release(rb_task *t) {
    if (--t->refs > 0) return;
    recycle_thread(t);
    free(t->waiters);
    free(t);
}

rb_task *rb_task_current(lua_State *L) {
    rb_task *t = rb_proc.current;
    return (t && t->co == L) ? t : NULL;
}

static void task_finish(rb_task *t, int status) {
    t->finished = 1;
    t->status = status;
    if (t->on_done) t->on_done(t, status, t->data);
    for (int i = 0; i < t->nwaiters; i++) rb_wait_wake(t->waiters[i]);
    t->nwaiters = 0;
    rb_task_release(t); /* the running reference */
}

static void task_resume(rb_task *t, int nargs) {
    rb_task *prev = rb_proc.current;
    rb_proc.current = t;
    int status = lua_resume(t->co, nargs);
    rb_proc.current = prev;
    if (status != LUA_YIELD) {
        task_finish(t, status);
    } else if (!t->wait) {
        /* A bare coroutine.yield(): give the others a turn, then go on. */
        lua_settop(t->co, 0);
        make_ready(t);
    }
}

rb_task *rb_task_spawn(lua_State *L, int nargs, rb_task_done *on_done, void *data) {
    rb_task *t = calloc(1, sizeof *t);
    if (!t) {
        lua_pop(L, nargs + 1);
        return NULL;
    }
    lua_State *co;
    if (rb_proc.nidle_threads > 0) {
        int i = --rb_proc.nidle_threads;
        co = rb_proc.idle_threads[i].co;
        t->co_ref = rb_proc.idle_threads[i].ref;
    } else {
        co = lua_newthread(L);
        t->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_xmove(L, co, nargs + 1);
    t->co = co;
    t->refs = 2; /* running + the caller's, so t survives a body that never waits */
    t->on_done = on_done;
    t->data = data;
    task_resume(t, nargs);
    return t;
}

int rb_task_run_ready(void) {
    int ran = 0;
    rb_task *t;
    /* Only what was ready on entry: a task that yields bare goes to the next round. */
    rb_task *last = rb_proc.ready_tail;
    while ((t = rb_proc.ready_head) != NULL) {
        rb_proc.ready_head = t->next_ready;
        if (!rb_proc.ready_head) rb_proc.ready_tail = NULL;
        int nargs = 0;
        rb_wait *w = t->wait;
        if (w) {
            t->wait = NULL;
            nargs = w->push(w, t->co);
        }
        task_resume(t, nargs);
        ran = 1;
        if (t == last) break;
    }
    return ran;
}

int rb_wait_for(lua_State *L, rb_wait *w) {
    if (w->woken) return w->push(w, L); /* settled before we could wait */
    rb_task *t = rb_task_current(L);
    if (t) {
        w->task = t;
        t->wait = w;
        return lua_yield(L, 0);
    }
    /* The main thread, or a coroutine the loop does not own: block here by
     * running the loop until this wait is satisfied. */
    w->task = NULL;
    rb_loop *loop = rb_get_loop();
    while (!w->woken) rb_loop_run_once(loop, -1);
    return w->push(w, L);
}

void rb_wait_wake(rb_wait *w) {
    if (w->woken) return;
    w->woken = 1;
    if (w->task)
        make_ready(w->task);
    else
        rb_proc.blocked_woken = 1; /* the loop must return, not sleep */
}

/* ---- rabi.spawn / rabi.wait ---- */

typedef struct {
    rb_wait wait;
    rb_task *target;
} join_wait;

static int push_results(rb_task *t, lua_State *L) {
    t->collected = 1;
    if (t->status != 0) {
        lua_pushboolean(L, 0);
        lua_pushvalue(t->co, -1);
        lua_xmove(t->co, L, 1);
        return 2;
    }
    int n = lua_gettop(t->co);
    luaL_checkstack(L, n + 1, "too many results");
    lua_pushboolean(L, 1);
    for (int i = 1; i <= n; i++) {
        lua_pushvalue(t->co, i);
        lua_xmove(t->co, L, 1);
    }
    return n + 1;
}

static int join_push(rb_wait *w, lua_State *L) {
    join_wait *jw = (join_wait *)w;
    int n = push_results(jw->target, L);
    rb_task_release(jw->target);
    free(jw);
    return n;
}

static rb_task *check_handle(lua_State *L, int idx) {
    rb_task **h = luaL_checkudata(L, idx, TASK_HANDLE);
    if (!*h) luaL_argerror(L, idx, "task handle already released");
    return *h;
}

static int api_spawn(lua_State *L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    int nargs = lua_gettop(L) - 1;
    rb_task **h = lua_newuserdata(L, sizeof *h);
    *h = NULL;
    luaL_getmetatable(L, TASK_HANDLE);
    lua_setmetatable(L, -2);
    lua_insert(L, 1); /* handle below the function and its arguments */
    rb_task *t = rb_task_spawn(L, nargs, NULL, NULL);
    if (!t) return luaL_error(L, "out of memory spawning a task");
    *h = t; /* the caller's reference becomes the handle's */
    return 1;
}

static int api_wait(lua_State *L) {
    rb_task *t = check_handle(L, 1);
    if (t->finished) return push_results(t, L);
    join_wait *jw = calloc(1, sizeof *jw);
    rb_wait **grown = realloc(t->waiters, (size_t)(t->nwaiters + 1) * sizeof *grown);
    if (!jw || !grown) {
        free(jw);
        if (grown) t->waiters = grown;
        return luaL_error(L, "out of memory waiting for a task");
    }
    t->waiters = grown;
    t->waiters[t->nwaiters++] = &jw->wait;
    jw->wait.push = join_push;
    jw->target = t;
    t->refs++;
    return rb_wait_for(L, &jw->wait);
}

static int api_task_status(lua_State *L) {
    rb_task *t = check_handle(L, 1);
    lua_pushstring(L, !t->finished ? "running" : t->status == 0 ? "done" : "failed");
    return 1;
}

/* The error may be any value: tostring() it in a protected call, since a
 * finalizer must not raise. */
static void warn_uncollected(lua_State *L, rb_task *t) {
    lua_getglobal(L, "tostring");
    lua_pushvalue(t->co, -1);
    lua_xmove(t->co, L, 1);
    const char *text = lua_pcall(L, 1, 1, 0) == 0 ? lua_tostring(L, -1) : NULL;
    rb_log(RB_LOG_WARN, "a spawned task failed and was never waited for: %s",
           text ? text : "(an error value)");
    lua_pop(L, 1);
}

static int handle_gc(lua_State *L) {
    rb_task **h = luaL_checkudata(L, 1, TASK_HANDLE);
    if (*h) {
        rb_task *t = *h;
        if (t->finished && t->status != 0 && !t->collected) warn_uncollected(L, t);
        rb_task_release(t);
        *h = NULL;
    }
    return 0;
}

static int run_ready_hook(rb_loop *loop, void *data) {
    (void)loop;
    (void)data;
    rb_task_run_ready();
    /* A task that finished here may have satisfied a blocking rabi.wait():
     * then the loop must not go to sleep before its caller looks. */
    int pending = rb_proc.ready_head != NULL || rb_proc.blocked_woken;
    rb_proc.blocked_woken = 0;
    return pending;
}

void rb_open_task(lua_State *L) {
    static const luaL_Reg methods[] = {{"wait", api_wait}, {"status", api_task_status}, {NULL, NULL}};
    rb_register_class(L, TASK_HANDLE, methods, handle_gc);
    lua_pushcfunction(L, api_spawn);
    lua_setfield(L, -2, "spawn");
    lua_pushcfunction(L, api_wait);
    lua_setfield(L, -2, "wait");
    rb_loop_add_before_sleep(rb_get_loop(), run_ready_hook, NULL);
}

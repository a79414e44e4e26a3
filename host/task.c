/* The scheduler: tasks (Lua coroutines owned by the loop) and their waits.
 *
 * A woken task is not resumed from inside the event handler that woke it:
 * it goes on a ready queue that the loop drains before it sleeps. Handlers
 * (a frame parser, a timer) therefore never see Lua code run underneath them
 * and close the very link they are iterating. The price is one queue hop
 * per wake-up, paid in the same loop turn. */
#include "task.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bind.h"
#include "lauxlib.h"
#include "log.h"
#include "trace.h"

#define IDLE_THREADS 256
/* Task records kept for reuse: a call's task is made and freed per delivery. */
#define SPARE_TASKS 256

struct rb_task {
    rb_sched *sched;
    lua_State *co; /* the entry coroutine: the body's */
    int refs;      /* 1 while running + 1 per holder (the spawner, a handle) */
    int finished, status;
    int collected; /* someone got its results through rabi.wait */
    rb_wait *wait; /* what the task is blocked on */
    const char *cancelled;
    double deadline;
    rb_timer deadline_timer;
    rb_task_done *on_done;
    void *data;
    rb_task *next_ready;
    rb_task *prev_live, *next_live;
    rb_wait **waiters; /* rabi.wait() callers */
    int nwaiters;
    /* The user's coroutines this task runs, each resumed by the one below
     * it (chain[0] by co); the last one is running, or parked in a wait. */
    lua_State **chain;
    int depth, chain_cap;
    lua_State *resuming;                      /* the target of a coroutine.resume under way */
    rb_watch_call *watch;                     /* the call it runs for, as the watchdog names it */
    char traceparent[RB_TRACEPARENT_LEN + 1]; /* the call's trace; "": none */
    char cid[RB_TASK_CID_MAX + 1];            /* the call's correlation id; "": none */
};

struct rb_sched {
    lua_State *L;       /* the main state: coroutines are made from it */
    lua_State *builder; /* see rb_sched_builder (anchored at builder_ref) */
    int builder_ref;
    rb_loop *loop;
    rb_task *current; /* the task now running, if any */
    rb_task *ready_head, *ready_tail;
    rb_task *live; /* every task spawned and not finished */
    int nlive;
    int blocked_woken; /* a blocking (main-thread) wait was satisfied */
    /* Registry table: thread -> true for every coroutine the scheduler
     * holds (a task's, running or idle, and a user's while it is in a
     * task's chain). It anchors them, and user code may not resume them. */
    int threads_ref;
    lua_State *idle[IDLE_THREADS]; /* finished coroutines to reuse */
    int nidle;
    rb_task *spare; /* freed task records, chained by next_ready */
    int nspare;
};

double rb_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- the scheduler ---- */

static int run_ready_hook(rb_loop *loop, void *data);

rb_sched *rb_sched_new(lua_State *L, rb_loop *loop) {
    rb_sched *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->L = L;
    s->loop = loop;
    if (rb_loop_add_before_sleep(loop, run_ready_hook, s) < 0) {
        free(s);
        return NULL;
    }
    lua_newtable(L);
    s->threads_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    s->builder = lua_newthread(L);
    s->builder_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return s;
}

lua_State *rb_sched_builder(const rb_sched *s) {
    return s->builder;
}

void rb_sched_free(rb_sched *s) {
    if (!s) return;
    rb_loop_del_before_sleep(s->loop, run_ready_hook, s);
    while (s->spare) {
        rb_task *t = s->spare;
        s->spare = t->next_ready;
        free(t);
    }
    free(s);
}

rb_loop *rb_sched_loop(const rb_sched *s) {
    return s->loop;
}

lua_State *rb_sched_state(const rb_sched *s) {
    return s->L;
}

void rb_sched_cancel_all(rb_sched *s, const char *reason) {
    /* Cancelling only makes tasks ready; none runs (or leaves the list)
     * before this returns. */
    for (rb_task *t = s->live; t; t = t->next_live) rb_task_cancel(t, reason);
}

static void make_ready(rb_task *t) {
    rb_sched *s = t->sched;
    t->next_ready = NULL;
    if (s->ready_tail)
        s->ready_tail->next_ready = t;
    else
        s->ready_head = t;
    s->ready_tail = t;
}

/* threads[co] = held or nil, through co's own stack (any thread will do,
 * and co is at hand wherever this is needed). */
static void hold_thread(rb_sched *s, lua_State *co, int held) {
    lua_checkstack(co, 3);
    lua_rawgeti(co, LUA_REGISTRYINDEX, s->threads_ref);
    lua_pushthread(co);
    if (held)
        lua_pushboolean(co, 1);
    else
        lua_pushnil(co);
    lua_rawset(co, -3);
    lua_pop(co, 1);
}

static int is_held(rb_sched *s, lua_State *L, int idx) {
    lua_pushvalue(L, idx);
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->threads_ref);
    lua_insert(L, -2);
    lua_rawget(L, -2);
    int held = lua_toboolean(L, -1);
    lua_pop(L, 2);
    return held;
}

/* ---- tasks ---- */

lua_State *rb_task_thread(const rb_task *t) {
    return t->co;
}

/* The coroutine the task runs now: the top of its chain. */
static lua_State *task_top(const rb_task *t) {
    return t->depth > 0 ? t->chain[t->depth - 1] : t->co;
}

rb_task *rb_task_current(rb_sched *s, lua_State *L) {
    rb_task *t = s->current;
    return (t && task_top(t) == L) ? t : NULL;
}

double rb_task_time_left(const rb_task *t) {
    return t && t->deadline > 0 ? t->deadline - rb_now_s() : HUGE_VAL;
}

void rb_task_cancel(rb_task *t, const char *reason) {
    if (t->finished || t->cancelled) return;
    t->cancelled = reason;
    if (t->wait) rb_wait_cancel(t->wait, reason);
}

static void deadline_passed(rb_loop *loop, void *data) {
    (void)loop;
    rb_task_cancel(data, "the caller's deadline passed");
}

/* A coroutine whose body returned normally is as good as new (status 0,
 * nothing on its call stack): keeping a few saves a thread and a registry
 * reference per call. One that raised is dead and is let go. */
static void recycle_thread(rb_task *t) {
    rb_sched *s = t->sched;
    if (t->finished && t->status == 0 && s->nidle < IDLE_THREADS) {
        lua_settop(t->co, 0);
        s->idle[s->nidle++] = t->co;
    } else {
        hold_thread(s, t->co, 0);
    }
}

void rb_task_release(rb_task *t) {
    if (--t->refs > 0) return;
    rb_sched *s = t->sched;
    recycle_thread(t);
    rb_watch_call_release(t->watch);
    free(t->waiters);
    free(t->chain);
    if (s->nspare < SPARE_TASKS) {
        t->next_ready = s->spare; /* rb_task_spawn clears the whole record */
        s->spare = t;
        s->nspare++;
    } else {
        free(t);
    }
}

static void unlink_live(rb_task *t) {
    rb_sched *s = t->sched;
    if (t->prev_live)
        t->prev_live->next_live = t->next_live;
    else
        s->live = t->next_live;
    if (t->next_live) t->next_live->prev_live = t->prev_live;
    s->nlive--;
}

static void task_finish(rb_task *t, int status) {
    t->finished = 1;
    t->status = status;
    rb_timer_stop(t->sched->loop, &t->deadline_timer);
    unlink_live(t);
    if (t->on_done) t->on_done(t, status, t->data);
    for (int i = 0; i < t->nwaiters; i++) rb_wait_wake(t->waiters[i]);
    t->nwaiters = 0;
    rb_task_release(t); /* the running reference */
}

/* The top coroutine of t's chain yielded to its resumer or ended (status):
 * it leaves the chain, and what coroutine.resume returns to the resumer
 * (true and the values, or false and the error) is moved onto it.
 * Returns how many values that is. */
static int return_to_resumer(rb_task *t, lua_State *co, int status) {
    lua_State *parent = --t->depth > 0 ? t->chain[t->depth - 1] : t->co;
    int ok = status == 0 || status == LUA_YIELD;
    int n = ok ? lua_gettop(co) : 1;
    if (!lua_checkstack(parent, n + 1)) {
        lua_settop(co, 0);
        ok = 0;
        n = 1;
        lua_pushliteral(co, "too many results to resume");
        lua_checkstack(parent, 2);
    }
    lua_pushboolean(parent, ok);
    lua_xmove(co, parent, n);
    hold_thread(t->sched, co, 0);
    return n + 1;
}

/* Runs t from the top of its chain, passing nargs values, until it waits,
 * yields bare or ends. The user's coroutines run here, flat, as in
 * OpenResty's ngx_http_lua_run_thread: coroutine.resume yields to this
 * loop, which resumes the target; the target's yield or return goes back to
 * its resumer. So a wait anywhere in the chain parks the whole task in the
 * event loop, and its wake-up resumes the coroutine that waited. */
static void task_resume(rb_task *t, int nargs) {
    rb_sched *s = t->sched;
    rb_task *prev = s->current;
    s->current = t;
    rb_watch_call *was = rb_watchdog_enter(t->watch);
    for (;;) {
        lua_State *co = task_top(t);
        int status = lua_resume(co, nargs);
        if (status == LUA_YIELD && t->wait) break; /* parked until woken */
        if (status == LUA_YIELD && t->resuming) {
            lua_State *target = t->resuming;
            t->resuming = NULL;
            t->chain[t->depth++] = target;
            nargs = lua_gettop(co);
            lua_xmove(co, target, nargs);
        } else if (t->depth > 0) {
            nargs = return_to_resumer(t, co, status);
        } else if (status == LUA_YIELD) {
            /* A bare coroutine.yield() of the body: give the others a
             * turn, then go on. */
            lua_settop(co, 0);
            make_ready(t);
            break;
        } else {
            task_finish(t, status); /* may free t */
            break;
        }
    }
    rb_watchdog_leave(was);
    s->current = prev;
}

static lua_State *take_thread(rb_sched *s, lua_State *L) {
    if (s->nidle > 0) return s->idle[--s->nidle];
    lua_State *co = lua_newthread(L);
    hold_thread(s, co, 1);
    lua_pop(L, 1);
    return co;
}

rb_task *rb_task_spawn(rb_sched *s, lua_State *L, int nargs, const rb_task_opts *opts) {
    rb_task *t = s->spare;
    if (t) {
        s->spare = t->next_ready;
        s->nspare--;
        memset(t, 0, sizeof *t); /* nothing of the task before it */
    } else if (!(t = calloc(1, sizeof *t))) {
        lua_pop(L, nargs + 1);
        return NULL;
    }
    t->sched = s;
    t->co = take_thread(s, L);
    lua_xmove(L, t->co, nargs + 1);
    t->refs = 2; /* running + the caller's, so t survives a body that never waits */
    rb_timer_init(&t->deadline_timer, deadline_passed, t);
    if (opts) {
        t->on_done = opts->on_done;
        t->data = opts->data;
        t->deadline = opts->deadline;
        t->watch = opts->watch;
        rb_watch_call_retain(t->watch);
        if (opts->traceparent) memcpy(t->traceparent, opts->traceparent, RB_TRACEPARENT_LEN);
        if (opts->cid) {
            size_t n = strnlen(opts->cid, RB_TASK_CID_MAX);
            memcpy(t->cid, opts->cid, n);
            t->cid[n] = '\0';
        }
    }
    t->next_live = s->live;
    if (s->live) s->live->prev_live = t;
    s->live = t;
    s->nlive++;
    if (t->deadline > 0) {
        double left = t->deadline - rb_now_s();
        if (left <= 0)
            t->cancelled = "the caller's deadline passed";
        else
            rb_timer_start(s->loop, &t->deadline_timer, left);
    }
    task_resume(t, nargs);
    return t;
}

static int run_ready(rb_sched *s);

/* ---- waits ---- */

void rb_wait_init(rb_wait *w, rb_sched *s, const rb_wait_ops *ops) {
    w->ops = ops;
    w->sched = s;
    w->task = NULL;
    w->woken = 0;
    w->cancelled = NULL;
}

/* Pushes what the waiter gets, and frees the wait. */
static int settle(rb_wait *w, lua_State *L) {
    int n;
    if (w->cancelled && w->ops->push_cancelled) {
        n = w->ops->push_cancelled(w, L, w->cancelled);
    } else if (w->cancelled) {
        lua_pushnil(L);
        rb_new_error(L, "cancelled", w->cancelled);
        n = 2;
    } else {
        n = w->ops->push(w, L);
    }
    w->ops->release(w);
    return n;
}

/* A wait that cannot be waited for here: give it up, and say why. */
static int refuse_wait(lua_State *L, rb_wait *w, const char *why) {
    w->ops->detach(w);
    w->ops->release(w);
    return luaL_error(L, "%s", why);
}

int rb_wait_for(lua_State *L, rb_wait *w) {
    rb_sched *s = w->sched;
    rb_task *t = rb_task_current(s, L);
    if (!w->woken && t && t->cancelled) rb_wait_cancel(w, t->cancelled);
    if (w->woken) return settle(w, L); /* settled before we could wait */
    if (t) {
        if (!lua_isyieldable(L))
            return refuse_wait(L, w,
                               "cannot wait inside a C call (a metamethod, an iterator or "
                               "comparator called from C)");
        w->task = t;
        t->wait = w;
        return lua_yield(L, 0);
    }
    /* Inside a task, but in a coroutine resumed directly: by the stock
     * library, or across a C call. Yielding would return to that resume,
     * and blocking would run a loop inside the task. */
    if (s->current)
        return refuse_wait(L, w,
                           "cannot wait in a coroutine that the stock coroutine library (or a C call) "
                           "resumed inside a task: resume it with rabi.coroutine's resume or wrap, "
                           "which rabihost makes the global coroutine's");
    /* The main thread, or a coroutine it resumed: block here by running the
     * loop until this wait is satisfied. */
    while (!w->woken) rb_loop_run_once(s->loop, -1);
    return settle(w, L);
}

void rb_wait_wake(rb_wait *w) {
    if (w->woken) return;
    w->woken = 1;
    if (w->task)
        make_ready(w->task);
    else
        w->sched->blocked_woken = 1; /* the loop must return, not sleep */
}

void rb_wait_cancel(rb_wait *w, const char *reason) {
    if (w->woken) return; /* settled already: its results win */
    w->ops->detach(w);
    w->cancelled = reason;
    rb_wait_wake(w);
}

/* Resumes the tasks made ready before this call; 1 if any ran. */
static int run_ready(rb_sched *s) {
    int ran = 0;
    rb_task *t;
    /* Only what was ready on entry: a task that yields bare goes to the next round. */
    rb_task *last = s->ready_tail;
    while ((t = s->ready_head) != NULL) {
        s->ready_head = t->next_ready;
        if (!s->ready_head) s->ready_tail = NULL;
        int nargs = 0;
        rb_wait *w = t->wait;
        if (w) {
            t->wait = NULL;
            nargs = settle(w, task_top(t));
        }
        task_resume(t, nargs);
        ran = 1;
        if (t == last) break;
    }
    return ran;
}

static int run_ready_hook(rb_loop *loop, void *data) {
    (void)loop;
    rb_sched *s = data;
    run_ready(s);
    /* A task that finished here may have satisfied a blocking rabi.wait():
     * then the loop must not go to sleep before its caller looks. */
    int pending = s->ready_head != NULL || s->blocked_woken;
    s->blocked_woken = 0;
    return pending;
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
    return push_results(((join_wait *)w)->target, L);
}

static void join_detach(rb_wait *w) {
    rb_task *t = ((join_wait *)w)->target;
    for (int i = 0; i < t->nwaiters; i++) {
        if (t->waiters[i] == w) {
            t->waiters[i] = t->waiters[--t->nwaiters];
            return;
        }
    }
}

static void join_release(rb_wait *w) {
    rb_task_release(((join_wait *)w)->target);
    free(w);
}

static const rb_wait_ops join_ops = {join_push, join_detach, join_release, NULL};

static rb_task *check_handle(lua_State *L, int idx) {
    rb_task **h = luaL_checkudata(L, idx, RB_TASK_CLASS);
    if (!*h) luaL_argerror(L, idx, "task handle already released");
    return *h;
}

/* core.spawn(fn, ...) -> handle. A task spawned by a task inherits its
 * deadline and its call: it works for the same caller. */
int rb_api_spawn(lua_State *L) {
    rb_sched *s = rb_sched_of(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    int nargs = lua_gettop(L) - 1;
    rb_task *parent = rb_task_current(s, L);
    rb_task_opts opts = {NULL,
                         NULL,
                         parent ? parent->deadline : 0,
                         parent ? parent->watch : NULL,
                         parent && *parent->traceparent ? parent->traceparent : NULL,
                         parent && *parent->cid ? parent->cid : NULL};
    rb_task **h = lua_newuserdata(L, sizeof *h);
    *h = NULL;
    luaL_getmetatable(L, RB_TASK_CLASS);
    lua_setmetatable(L, -2);
    lua_insert(L, 1); /* handle below the function and its arguments */
    rb_task *t = rb_task_spawn(s, L, nargs, &opts);
    if (!t) return luaL_error(L, "spawn: out of memory");
    *h = t; /* the caller's reference becomes the handle's */
    return 1;
}

/* core.wait(handle) -> true, results... | false, error (the task raised) |
 * nil, error (this wait was cancelled) */
int rb_api_wait(lua_State *L) {
    rb_sched *s = rb_sched_of(L);
    rb_task *t = check_handle(L, 1);
    if (t->finished) return push_results(t, L);
    join_wait *jw = calloc(1, sizeof *jw);
    rb_wait **grown = realloc(t->waiters, (size_t)(t->nwaiters + 1) * sizeof *grown);
    if (!jw || !grown) {
        free(jw);
        if (grown) t->waiters = grown;
        return luaL_error(L, "wait: out of memory");
    }
    t->waiters = grown;
    t->waiters[t->nwaiters++] = &jw->wait;
    rb_wait_init(&jw->wait, s, &join_ops);
    jw->target = t;
    t->refs++;
    return rb_wait_for(L, &jw->wait);
}

int rb_api_in_task(lua_State *L) {
    lua_pushboolean(L, rb_task_current(rb_sched_of(L), L) != NULL);
    return 1;
}

/* The trace lives in the task, not in a table keyed by coroutine: it goes
 * with the task, and a coroutine reused for another task (or a handler's
 * own coroutine running in its task) sees the trace of the task it runs. */
const char *rb_task_traceparent(const rb_task *t) {
    return t->traceparent;
}

int rb_api_trace_current(lua_State *L) {
    rb_task *t = rb_task_current(rb_sched_of(L), L);
    if (t && *t->traceparent)
        lua_pushlstring(L, t->traceparent, RB_TRACEPARENT_LEN);
    else
        lua_pushnil(L);
    return 1;
}

int rb_api_task_cid(lua_State *L) {
    rb_task *t = rb_task_current(rb_sched_of(L), L);
    if (t)
        lua_pushstring(L, t->cid);
    else
        lua_pushnil(L);
    return 1;
}

int rb_api_trace_set(lua_State *L) {
    size_t n = 0;
    const char *tp = lua_isnil(L, 1) ? NULL : luaL_checklstring(L, 1, &n);
    if (tp && n != RB_TRACEPARENT_LEN) luaL_argerror(L, 1, "a traceparent (version 00) expected");
    rb_task *t = rb_task_current(rb_sched_of(L), L);
    if (!t) return 0;
    if (tp)
        memcpy(t->traceparent, tp, RB_TRACEPARENT_LEN);
    else
        t->traceparent[0] = '\0';
    return 0;
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

int rb_api_task_gc(lua_State *L) {
    rb_task **h = luaL_checkudata(L, 1, RB_TASK_CLASS);
    if (*h) {
        rb_task *t = *h;
        if (t->finished && t->status != 0 && !t->collected) warn_uncollected(L, t);
        rb_task_release(t);
        *h = NULL;
    }
    return 0;
}

/* handle:cancel() -> true when the task was still running. Its current
 * wait, and every later one, fails with kind "cancelled". */
static int api_task_cancel(lua_State *L) {
    rb_task *t = check_handle(L, 1);
    lua_pushboolean(L, !t->finished);
    rb_task_cancel(t, "cancelled by its spawner");
    return 1;
}

const luaL_Reg rb_task_methods[] = {
    {"wait", rb_api_wait}, {"status", api_task_status}, {"cancel", api_task_cancel}, {NULL, NULL}};

/* ---- coroutine.resume and coroutine.status, for coroutines that wait ----
 *
 * Inside a task, resume does not call lua_resume itself: it yields to
 * task_resume, which runs the target as the new top of the task's chain.
 * Elsewhere (the main thread, a C call that cannot yield) it resumes the
 * target directly, as the stock resume does. create, yield, running and
 * isyieldable need nothing of their own: a stock yield at the top of a
 * chain returns to task_resume, which tells it from a wait (t->wait) and a
 * resume (t->resuming). */

enum { CO_RUNNING, CO_SUSPENDED, CO_NORMAL, CO_DEAD };
static const char *const co_status_names[] = {"running", "suspended", "normal", "dead"};

/* As Lua 5.1's costatus, but a coroutine the scheduler holds is never
 * suspended: it waits in the loop (or is a task's), so only the scheduler
 * may resume it. */
static int co_status(rb_sched *s, lua_State *L, int idx) {
    lua_State *co = lua_tothread(L, idx);
    if (co == L) return CO_RUNNING;
    int st;
    lua_Debug ar;
    switch (lua_status(co)) {
    case LUA_YIELD: st = CO_SUSPENDED; break;
    case 0:
        if (lua_getstack(co, 0, &ar) > 0)
            st = CO_NORMAL;
        else
            st = lua_gettop(co) == 0 ? CO_DEAD : CO_SUSPENDED;
        break;
    default: st = CO_DEAD;
    }
    return st == CO_SUSPENDED && is_held(s, L, idx) ? CO_NORMAL : st;
}

/* lua_resume here and now: true and what co yielded or returned, or false
 * and its error. */
static int resume_directly(lua_State *L, lua_State *co, int nargs) {
    if (!lua_checkstack(co, nargs)) {
        lua_pushboolean(L, 0);
        lua_pushliteral(L, "too many arguments to resume");
        return 2;
    }
    lua_xmove(L, co, nargs);
    int status = lua_resume(co, nargs);
    if (status != 0 && status != LUA_YIELD) {
        lua_pushboolean(L, 0);
        lua_xmove(co, L, 1);
        return 2;
    }
    int n = lua_gettop(co);
    if (!lua_checkstack(L, n + 1)) {
        lua_settop(co, 0);
        lua_pushboolean(L, 0);
        lua_pushliteral(L, "too many results to resume");
        return 2;
    }
    lua_pushboolean(L, 1);
    lua_xmove(co, L, n);
    return n + 1;
}

/* coroutine.resume(co, ...) -> true, values... | false, error */
int rb_api_co_resume(lua_State *L) {
    rb_sched *s = rb_sched_of(L);
    luaL_argcheck(L, lua_type(L, 1) == LUA_TTHREAD, 1, "coroutine expected");
    int st = co_status(s, L, 1);
    if (st != CO_SUSPENDED) {
        /* LuaJIT's two messages: a normal coroutine is "running" too. */
        lua_pushboolean(L, 0);
        lua_pushstring(L, st == CO_DEAD ? "cannot resume dead coroutine" : "cannot resume running coroutine");
        return 2;
    }
    lua_State *co = lua_tothread(L, 1);
    int nargs = lua_gettop(L) - 1;
    rb_task *t = rb_task_current(s, L);
    if (!t || !lua_isyieldable(L)) return resume_directly(L, co, nargs);
    if (t->depth == t->chain_cap) {
        int cap = t->chain_cap ? 2 * t->chain_cap : 4;
        lua_State **grown = realloc(t->chain, (size_t)cap * sizeof *grown);
        if (!grown) return luaL_error(L, "resume: out of memory");
        t->chain = grown;
        t->chain_cap = cap;
    }
    hold_thread(s, co, 1);
    t->resuming = co;
    return lua_yield(L, nargs);
}

/* coroutine.status(co) -> "running" | "suspended" | "normal" | "dead" */
int rb_api_co_status(lua_State *L) {
    luaL_argcheck(L, lua_type(L, 1) == LUA_TTHREAD, 1, "coroutine expected");
    lua_pushstring(L, co_status_names[co_status(rb_sched_of(L), L, 1)]);
    return 1;
}

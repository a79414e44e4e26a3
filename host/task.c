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
#include <time.h>

#include "bind.h"
#include "lauxlib.h"
#include "log.h"

#define IDLE_THREADS 256

struct rb_task {
    rb_sched *sched;
    lua_State *co;
    int co_ref; /* anchors the coroutine while anyone needs it */
    int refs;   /* 1 while running + 1 per holder (the spawner, a handle) */
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
};

struct rb_sched {
    lua_State *L; /* the main state: coroutines are made from it */
    rb_loop *loop;
    rb_task *current; /* the task now running, if any */
    rb_task *ready_head, *ready_tail;
    rb_task *live; /* every task spawned and not finished */
    int nlive;
    int blocked_woken; /* a blocking (main-thread) wait was satisfied */
    struct {
        lua_State *co;
        int ref;
    } idle[IDLE_THREADS]; /* finished coroutines to reuse */
    int nidle;
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
    return s;
}

void rb_sched_free(rb_sched *s) {
    if (!s) return;
    rb_loop_del_before_sleep(s->loop, run_ready_hook, s);
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

/* ---- tasks ---- */

lua_State *rb_task_thread(const rb_task *t) {
    return t->co;
}

rb_task *rb_task_current(rb_sched *s, lua_State *L) {
    rb_task *t = s->current;
    return (t && t->co == L) ? t : NULL;
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
        s->idle[s->nidle].co = t->co;
        s->idle[s->nidle++].ref = t->co_ref;
    } else {
        luaL_unref(s->L, LUA_REGISTRYINDEX, t->co_ref);
    }
}

void rb_task_release(rb_task *t) {
    if (--t->refs > 0) return;
    recycle_thread(t);
    free(t->waiters);
    free(t);
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

static void task_resume(rb_task *t, int nargs) {
    rb_sched *s = t->sched;
    rb_task *prev = s->current;
    s->current = t;
    int status = lua_resume(t->co, nargs);
    s->current = prev;
    if (status != LUA_YIELD) {
        task_finish(t, status);
    } else if (!t->wait) {
        /* A bare coroutine.yield(): give the others a turn, then go on. */
        lua_settop(t->co, 0);
        make_ready(t);
    }
}

static lua_State *take_thread(rb_sched *s, lua_State *L, int *ref) {
    if (s->nidle > 0) {
        int i = --s->nidle;
        *ref = s->idle[i].ref;
        return s->idle[i].co;
    }
    lua_State *co = lua_newthread(L);
    *ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return co;
}

rb_task *rb_task_spawn(rb_sched *s, lua_State *L, int nargs, const rb_task_opts *opts) {
    rb_task *t = calloc(1, sizeof *t);
    if (!t) {
        lua_pop(L, nargs + 1);
        return NULL;
    }
    t->sched = s;
    t->co = take_thread(s, L, &t->co_ref);
    lua_xmove(L, t->co, nargs + 1);
    t->refs = 2; /* running + the caller's, so t survives a body that never waits */
    rb_timer_init(&t->deadline_timer, deadline_passed, t);
    if (opts) {
        t->on_done = opts->on_done;
        t->data = opts->data;
        t->deadline = opts->deadline;
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
    if (w->cancelled) {
        lua_pushnil(L);
        rb_new_error(L, "cancelled", w->cancelled);
        n = 2;
    } else {
        n = w->ops->push(w, L);
    }
    w->ops->release(w);
    return n;
}

int rb_wait_for(lua_State *L, rb_wait *w) {
    rb_sched *s = w->sched;
    rb_task *t = rb_task_current(s, L);
    if (!w->woken && t && t->cancelled) rb_wait_cancel(w, t->cancelled);
    if (w->woken) return settle(w, L); /* settled before we could wait */
    if (t) {
        w->task = t;
        t->wait = w;
        return lua_yield(L, 0);
    }
    /* The main thread, or a coroutine the loop does not own: block here by
     * running the loop until this wait is satisfied. */
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
            nargs = settle(w, t->co);
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

static const rb_wait_ops join_ops = {join_push, join_detach, join_release};

static rb_task *check_handle(lua_State *L, int idx) {
    rb_task **h = luaL_checkudata(L, idx, RB_TASK_CLASS);
    if (!*h) luaL_argerror(L, idx, "task handle already released");
    return *h;
}

/* core.spawn(fn, ...) -> handle. A task spawned by a task with a deadline
 * inherits it: it works for the same caller. */
int rb_api_spawn(lua_State *L) {
    rb_sched *s = rb_sched_of(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    int nargs = lua_gettop(L) - 1;
    rb_task *parent = rb_task_current(s, L);
    rb_task_opts opts = {NULL, NULL, parent ? parent->deadline : 0};
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

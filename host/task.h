/* The scheduler: Lua coroutines ("tasks") owned by the loop, and the waits
 * they block on. It has no Lua API of its own beyond what task.c binds
 * (spawn, wait); every waiting API goes through rb_wait_for().
 *
 * A C function that must wait embeds an rb_wait, fills its ops, arms what
 * will wake it, and returns rb_wait_for(). Inside a task that yields, and
 * the loop resumes the task once rb_wait_wake() is called; on the main
 * thread (a script, the REPL) it drives the loop itself until woken.
 *
 * A task runs the user's own coroutines as a chain above its body (the
 * coroutine.resume of rb_api_co_resume, as OpenResty's coroutine API): a
 * wait in any of them parks the task, and the wake-up resumes the one that
 * waited. A wait in a coroutine the stock library resumed inside a task
 * fails: it could neither yield to the loop nor block.
 *
 * Every wait can be cancelled (rb_wait_cancel): its ops->detach stops it
 * waiting for the event, and the waiting coroutine resumes with nil and an
 * error value of kind "cancelled". A cancelled task stays cancelled: each
 * later wait of it fails at once, so a handler that catches the error
 * cannot wait on past a drain or its caller's deadline. */
#ifndef RB_TASK_H
#define RB_TASK_H

#include <stdint.h>

#include "loop.h"
#include "lauxlib.h"
#include "watchdog.h"

typedef struct rb_sched rb_sched;
typedef struct rb_task rb_task;
typedef struct rb_wait rb_wait;

typedef struct rb_wait_ops {
    /* Pushes the results of a settled wait onto L; returns how many. */
    int (*push)(rb_wait *w, lua_State *L);
    /* Stops waiting for the event (a timer, a table entry): the wait is
     * being cancelled and must not be woken by it any more. */
    void (*detach)(rb_wait *w);
    /* Frees the wait, once its results (or its cancellation) are pushed. */
    void (*release)(rb_wait *w);
    /* Optional: pushes what the waiter gets when the wait was cancelled
     * (why: the reason); returns how many. Without it: nil and an error
     * value of kind "cancelled" with why as its message. */
    int (*push_cancelled)(rb_wait *w, lua_State *L, const char *why);
} rb_wait_ops;

struct rb_wait {
    const rb_wait_ops *ops;
    rb_sched *sched;
    rb_task *task; /* NULL while a blocking caller waits */
    int woken;
    const char *cancelled; /* why, once cancelled (a static string) */
};

/* Called when the task's body returned (status 0, results on the task's
 * coroutine) or raised (status != 0, the error on top of it). */
typedef void rb_task_done(rb_task *t, int status, void *data);

typedef struct rb_task_opts {
    rb_task_done *on_done;
    void *data;
    double deadline;      /* rb_now_s() time after which its waits are cancelled; 0: none */
    rb_watch_call *watch; /* the call it runs for (the task takes a reference); NULL: none */
    /* The traceparent of the call it works for (RB_TRACEPARENT_LEN bytes,
     * copied); NULL: none. Its code, and the tasks it spawns, continue it. */
    const char *traceparent;
    /* The correlation id of that call (a string of at most RB_TASK_CID_MAX
     * bytes, copied); NULL: none. For its log lines. */
    const char *cid;
} rb_task_opts;
#define RB_TASK_CID_MAX 255

rb_sched *rb_sched_new(lua_State *L, rb_loop *loop);
void rb_sched_free(rb_sched *s);
rb_loop *rb_sched_loop(const rb_sched *s);
lua_State *rb_sched_state(const rb_sched *s);
/* A thread of the scheduler's own that runs no task and is never resumed.
 * A wait's push, which builds the values a waiting coroutine resumes with,
 * runs from the loop where no Lua error may be raised: what can raise (a
 * decoder making tables) runs on this thread through lua_cpcall, and its
 * results are then moved (lua_xmove) to the waiter. */
lua_State *rb_sched_builder(const rb_sched *s);
/* Cancels the waits of every live task (a drain that ran out of time). */
void rb_sched_cancel_all(rb_sched *s, const char *reason);

/* Creates a task whose body is the function below nargs arguments on L's
 * top (they are moved) and runs it at once until it first waits. The caller
 * holds one reference (rb_task_release). NULL when out of memory. */
rb_task *rb_task_spawn(rb_sched *s, lua_State *L, int nargs, const rb_task_opts *opts);
void rb_task_release(rb_task *t);
lua_State *rb_task_thread(const rb_task *t);
/* The task running L, or NULL when L is not a task (the main thread). */
rb_task *rb_task_current(rb_sched *s, lua_State *L);
/* The traceparent of the call t works for (RB_TRACEPARENT_LEN bytes), or
 * "" when none. */
const char *rb_task_traceparent(const rb_task *t);
/* Seconds left before t's deadline (may be <= 0); HUGE_VAL without one. */
double rb_task_time_left(const rb_task *t);
void rb_task_cancel(rb_task *t, const char *reason);

void rb_wait_init(rb_wait *w, rb_sched *s, const rb_wait_ops *ops);
int rb_wait_for(lua_State *L, rb_wait *w);
void rb_wait_wake(rb_wait *w);
void rb_wait_cancel(rb_wait *w, const char *reason);

/* Monotonic seconds (the clock of deadlines). */
double rb_now_s(void);

/* Lua API: core.spawn, core.wait, the task handle's methods, and the
 * coroutine.resume and coroutine.status that let the user's coroutines
 * wait inside a task (rabi.coroutine). */
int rb_api_spawn(lua_State *L);
int rb_api_wait(lua_State *L);
/* core.in_task() -> whether the caller runs in a task (it may wait there) */
int rb_api_in_task(lua_State *L);
/* core.trace_current() -> the traceparent of the call the running task
 * works for | nil (no task, or a task for no call) */
int rb_api_trace_current(lua_State *L);
/* core.trace_set(traceparent | nil): the running task works for that call
 * from now on (and tasks it spawns after). Outside a task: nothing. */
int rb_api_trace_set(lua_State *L);
/* core.task_cid() -> the correlation id of the call the running task works
 * for ("" for none, or a request that came without one) | nil outside a task */
int rb_api_task_cid(lua_State *L);
int rb_api_co_resume(lua_State *L);
int rb_api_co_status(lua_State *L);
extern const luaL_Reg rb_task_methods[];
int rb_api_task_gc(lua_State *L);
#define RB_TASK_CLASS "rabibridge.task"

#endif

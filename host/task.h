/* Tasks: Lua coroutines owned by the loop. A C function that must wait fills
 * an rb_wait, calls rb_wait_for() and returns its result: inside a task that
 * yields, and the loop resumes the task once rb_wait_wake() is called; on the
 * main thread (a script, the REPL) it drives the loop itself until woken. */
#ifndef RB_TASK_H
#define RB_TASK_H

#include "lua.h"

typedef struct rb_task rb_task;
typedef struct rb_wait rb_wait;

/* Pushes the results of a finished wait onto L and returns how many; it owns
 * the wait from then on (typically frees the struct embedding it). */
typedef int rb_wait_push(rb_wait *w, lua_State *L);

struct rb_wait {
    rb_task *task; /* the task to resume; NULL while a blocking caller waits */
    int woken;
    rb_wait_push *push;
};

/* Called when the task's body returned (status 0, results on t->co) or
 * raised (status != 0, message on top of t->co). */
typedef void rb_task_done(rb_task *t, int status, void *data);

struct rb_task {
    lua_State *co;
    int co_ref; /* anchors the coroutine while anyone needs it */
    int refs;   /* 1 while running + 1 per Lua handle */
    int finished, status;
    int collected; /* someone got its results through rabi.wait */
    rb_wait *wait; /* what the task is blocked on */
    rb_task_done *on_done;
    void *data;
    rb_task *next_ready;
    rb_wait **waiters; /* rabi.wait() callers */
    int nwaiters;
};

/* Creates a task whose body is the function below nargs arguments on L's
 * top (they are moved); runs it at once until it first waits. NULL on error. */
rb_task *rb_task_spawn(lua_State *L, int nargs, rb_task_done *on_done, void *data);
void rb_task_release(rb_task *t);
rb_task *rb_task_current(lua_State *L);

int rb_wait_for(lua_State *L, rb_wait *w);
void rb_wait_wake(rb_wait *w);

/* Resumes the tasks made ready since the last call; 1 if any ran. */
int rb_task_run_ready(void);

#endif

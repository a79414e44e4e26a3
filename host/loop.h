/* The event loop: file events, timers and before-sleep hooks, after Redis's
 * ae.c. One loop per process; everything that waits goes through it. */
#ifndef RB_LOOP_H
#define RB_LOOP_H

#include <stdint.h>

#define RB_READABLE 1
#define RB_WRITABLE 2

typedef struct rb_loop rb_loop;
typedef void rb_file_proc(rb_loop *loop, int fd, void *data, int mask);
typedef void rb_timer_proc(rb_loop *loop, void *data);
/* Returns nonzero when it left work that must run before the next wait
 * (so the loop polls with a zero timeout instead of sleeping). */
typedef int rb_before_sleep_proc(rb_loop *loop, void *data);

typedef struct rb_timer {
    uint64_t deadline_ms;
    int heap_index; /* -1 when not scheduled */
    rb_timer_proc *proc;
    void *data;
} rb_timer;

rb_loop *rb_loop_new(void);
void rb_loop_free(rb_loop *loop);
int rb_loop_after_fork(rb_loop *loop);

int rb_loop_add_file(rb_loop *loop, int fd, int mask, rb_file_proc *proc, void *data);
void rb_loop_del_file(rb_loop *loop, int fd);

/* Timers are embedded in their owner's struct, so arming one never allocates
 * except when the heap grows. */
void rb_timer_init(rb_timer *t, rb_timer_proc *proc, void *data);
int rb_timer_start(rb_loop *loop, rb_timer *t, double seconds);
void rb_timer_stop(rb_loop *loop, rb_timer *t);

int rb_loop_add_before_sleep(rb_loop *loop, rb_before_sleep_proc *proc, void *data);
void rb_loop_del_before_sleep(rb_loop *loop, rb_before_sleep_proc *proc, void *data);

/* Work that is cheaper done once for all the callbacks of a step of the
 * loop than by each (a link's writes: one send() for the requests of every
 * task the step ran) is deferred: proc(loop, data) runs once, after the
 * before-sleep hooks (so before the loop sleeps) or after the events and
 * timers (so before rb_loop_run_once returns), whichever comes first. -1
 * outside rb_loop_run_once (code that may not come back to the loop soon)
 * or out of memory: do it now. A deferred proc's return value counts as a
 * hook's. */
int rb_loop_defer(rb_loop *loop, rb_before_sleep_proc *proc, void *data);
/* Whether rb_loop_run_once is running (work deferred now will be done). */
int rb_loop_in_step(const rb_loop *loop);
/* Takes back what was deferred for proc and data (its owner is going). */
void rb_loop_cancel_deferred(rb_loop *loop, rb_before_sleep_proc *proc, void *data);

/* proc(data, 1) just before the loop waits for events, proc(data, 0) once
 * it is back: how a watchdog tells a loop that waits from one that is
 * stuck. One per loop; NULL removes it. */
void rb_loop_on_wait(rb_loop *loop, void (*proc)(void *data, int waiting), void *data);

/* Runs the before-sleep hooks, waits at most timeout_ms (-1: until an event)
 * and dispatches what arrived. Returns the number of events handled, -1 on
 * a poll error. Re-entrant: a blocking call may run it from inside a callback. */
int rb_loop_run_once(rb_loop *loop, int timeout_ms);

uint64_t rb_now_ms(void);
/* A duration in seconds as whole milliseconds, rounded to the nearest. */
static inline uint64_t rb_ms_of(double seconds) {
    return (uint64_t)(seconds * 1000.0 + 0.5);
}

/* The loop's epoll descriptor, readable while an event is due: a loop run
 * inside another poll (the supervisor's) waits on it, then runs once with a
 * zero timeout. */
int rb_loop_fd(const rb_loop *loop);

#endif

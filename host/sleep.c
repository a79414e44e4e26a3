/* core.sleep(seconds): arm a timer, yield; the timer wakes the task. On the
 * main thread the same wait drives the loop, so other tasks run meanwhile. */
#include "sleep.h"

#include <stdlib.h>

#include "bind.h"
#include "task.h"

typedef struct {
    rb_wait wait;
    rb_timer timer;
} sleep_wait;

static void sleep_fired(rb_loop *loop, void *data) {
    (void)loop;
    rb_wait_wake(&((sleep_wait *)data)->wait);
}

static int sleep_push(rb_wait *w, lua_State *L) {
    (void)w;
    lua_pushboolean(L, 1);
    return 1;
}

static void sleep_detach(rb_wait *w) {
    sleep_wait *sw = (sleep_wait *)w;
    rb_timer_stop(rb_sched_loop(w->sched), &sw->timer);
}

static void sleep_release(rb_wait *w) {
    free(w);
}

static const rb_wait_ops sleep_ops = {sleep_push, sleep_detach, sleep_release, NULL};

/* core.sleep(seconds) -> true | nil, error (cancelled) */
int rb_api_sleep(lua_State *L) {
    rb_sched *s = rb_sched_of(L);
    double seconds = luaL_checknumber(L, 1);
    luaL_argcheck(L, seconds >= 0, 1, "expected a non-negative number of seconds");
    sleep_wait *sw = calloc(1, sizeof *sw);
    if (!sw) return luaL_error(L, "sleep: out of memory");
    rb_wait_init(&sw->wait, s, &sleep_ops);
    rb_timer_init(&sw->timer, sleep_fired, sw);
    if (rb_timer_start(rb_sched_loop(s), &sw->timer, seconds) < 0) {
        free(sw);
        return luaL_error(L, "sleep: out of memory");
    }
    return rb_wait_for(L, &sw->wait);
}

/* core.now(): monotonic seconds, to the microsecond (for measuring calls). */
int rb_api_now(lua_State *L) {
    lua_pushnumber(L, rb_now_s());
    return 1;
}

/* rabi.sleep(seconds): arm a timer, yield; the timer wakes the task. On the
 * main thread the same wait drives the loop, so other tasks run meanwhile. */
#include <stdlib.h>
#include <time.h>

#include "core.h"
#include "lauxlib.h"
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
    (void)L;
    free(w);
    return 0;
}

static int api_sleep(lua_State *L) {
    double seconds = luaL_checknumber(L, 1);
    luaL_argcheck(L, seconds >= 0, 1, "expected a non-negative number of seconds");
    sleep_wait *sw = calloc(1, sizeof *sw);
    if (!sw) return luaL_error(L, "out of memory");
    sw->wait.push = sleep_push;
    rb_timer_init(&sw->timer, sleep_fired, sw);
    if (rb_timer_start(rb_get_loop(), &sw->timer, seconds) < 0) {
        free(sw);
        return luaL_error(L, "out of memory");
    }
    return rb_wait_for(L, &sw->wait);
}

/* rabi.now(): monotonic seconds, to the microsecond (for measuring calls). */
static int api_now(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
    return 1;
}

void rb_open_sleep(lua_State *L) {
    lua_pushcfunction(L, api_sleep);
    lua_setfield(L, -2, "sleep");
    lua_pushcfunction(L, api_now);
    lua_setfield(L, -2, "now");
}

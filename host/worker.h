/* A worker's life: starting, serving, reconnecting, draining, stopping.
 * This file owns it, and the signals and the ready pipe that drive it. */
#ifndef RB_WORKER_H
#define RB_WORKER_H

#include "lua.h"

/* The states of a worker's life, in the order of rb_worker_state_names:
 * the metrics report them by these names. */
typedef enum {
    RB_WORKER_STARTING,
    RB_WORKER_SERVING,
    RB_WORKER_RECONNECTING,
    RB_WORKER_DRAINING,
    RB_WORKER_STOPPING,
    RB_WORKER_STATES /* how many */
} rb_worker_state;

extern const char *const rb_worker_state_names[RB_WORKER_STATES];

/* In a freshly forked worker, before its Lua code runs: its number (for
 * the log), the pipe that tells the supervisor it consumes, and the
 * handlers that turn SIGTERM and SIGINT into a drain of at most
 * drain_timeout seconds (then the worker is killed). */
void rb_worker_prepare(int worker_id, int ready_fd, double drain_timeout);
/* Whether the worker left calls unanswered (a handler that never yielded
 * past --drain-timeout): then it must _exit, not close its Lua state,
 * since closing would only pretend to finish them. */
int rb_worker_abandoned(void);

int rb_api_worker_serve(lua_State *L);
int rb_api_process_info(lua_State *L);

#endif

/* The watchdog: what the supervisor knows of the call each worker is
 * running, through a region of shared memory mapped before the workers are
 * forked. This file owns that region, and with it:
 *
 *  - stalls: a call that holds its worker's loop past stall_limit gets its
 *    worker killed and replaced, and its caller an error reply;
 *  - poison requests: a request that was running when its worker died (or
 *    stalled) is counted, and once it has done so delivery_limit times its
 *    next delivery is answered with an error and acked instead of run;
 *  - orphans: a worker whose supervisor dies drains and exits.
 *
 * Each worker writes only its own slot (the call on the CPU, a heartbeat);
 * the supervisor writes the records of dead and stalled calls, which every
 * worker reads when a request comes back redelivered. A process that was
 * not forked by a supervisor (plain luajit, `rabihost run`) has no region,
 * and every function here is then a no-op. */
#ifndef RB_WATCHDOG_H
#define RB_WATCHDOG_H

#include <stddef.h>
#include <sys/types.h>

#include "lua.h"

struct rb_loop;
struct rb_server;

typedef struct rb_watchdog_settings {
    double stall_limit;   /* seconds; 0: stalls are not watched */
    int delivery_limit;   /* deaths a request may cause before it is refused; 0: no limit */
    double heap_limit;    /* MiB of Lua heap before a worker is replaced; 0: no limit */
    double drain_timeout; /* an orphaned worker's drain, before it is killed */
} rb_watchdog_settings;

/* ---- the supervisor's side ---- */

/* Maps the region for nslots worker slots. 0, or -1 with errno set. */
int rb_watchdog_open(int nslots, const rb_watchdog_settings *settings);
void rb_watchdog_close(void);
/* Before forking a worker into slot: forget what the last one wrote. */
void rb_watchdog_reset(int slot);
/* In the forked worker, first thing: its slot, and the death signal that
 * drains it when the supervisor dies. */
void rb_watchdog_child(int slot);

/* Whether the worker in slot asked for a successor (its heap passed
 * heap_limit, and it drains) since the last time this said so. */
int rb_watchdog_wants_successor(int slot);

typedef enum { RB_WATCH_FINE, RB_WATCH_STALLED, RB_WATCH_REPLACE } rb_watch_state;
/* A live worker's state. STALLED: it is logged, its call recorded and its
 * caller's error reply queued; the caller kills the worker. REPLACE: the
 * worker asked for a successor (its heap passed heap_limit) and drains. */
rb_watch_state rb_watchdog_inspect(int slot, int worker_id, pid_t pid);
/* A worker has died (why: "killed by signal 9"): the call it was running,
 * if any, is recorded against its request and logged. */
void rb_watchdog_reaped(int slot, int worker_id, pid_t pid, const char *why);

/* ---- a worker's side ---- */

/* A call as the watchdog names it. Tasks hold references: a task spawned
 * by a handler runs for the same call. */
typedef struct rb_watch_call rb_watch_call;

int rb_watchdog_armed(void);
/* NULL when not armed or out of memory. json: the request is JSON (its
 * error reply is too), else msgpack. */
rb_watch_call *rb_watch_call_new(const char *fn, const char *cid, const char *reply_to, int json);
void rb_watch_call_retain(rb_watch_call *c);
void rb_watch_call_release(rb_watch_call *c);

/* Around every resume of a task: enter says the call c (NULL: none) now
 * holds the loop and returns the one it took over from; leave hands the
 * loop back to that one. */
rb_watch_call *rb_watchdog_enter(rb_watch_call *c);
void rb_watchdog_leave(rb_watch_call *prev);

typedef enum { RB_VERDICT_RUN, RB_VERDICT_REFUSE, RB_VERDICT_DROP } rb_verdict;
/* What to do with a request that came back redelivered: RUN it, REFUSE it
 * (answer the error in why and ack: its worker died while running it
 * delivery_limit times), or DROP it (ack only: its caller was answered
 * when it stalled). Quorum queues count returns themselves (x-delivery-count,
 * and x-delivery-limit drops a message silently): declare their
 * x-delivery-limit above delivery_limit, so that this count answers the
 * caller first. */
rb_verdict rb_watchdog_verdict(const char *fn, const char *cid, const char *reply_to, char *why,
                               size_t whylen);

/* While a worker serves: its heartbeat around the loop's waits, the
 * answers owed to callers of stalled calls (sent through srv), its heap
 * against heap_limit, and its supervisor's death. L: the main state. */
void rb_watchdog_attach(struct rb_server *srv, struct rb_loop *loop, lua_State *L);
void rb_watchdog_detach(void);

#endif

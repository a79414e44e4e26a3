/* Metrics: counters the workers keep in a region of shared memory that the
 * supervisor maps before it forks them, and the supervisor's rendering of
 * them for Prometheus (GET /metrics) beside /healthz and /readyz.
 *
 * One slot of the region per supervisor worker slot, written only by the
 * worker process that runs in it (plain relaxed stores: no syscall, no
 * lock per call); the supervisor only reads them. A slot's counters are
 * never reset while the supervisor lives, so every sum it reports is
 * monotonic across restarts and reloads. Outside a worker started with
 * --metrics every worker-side call below does nothing. */
#ifndef RB_METRICS_H
#define RB_METRICS_H

#include <stdint.h>
#include <sys/types.h>

#include "loop.h"
#include "lua.h"
#include "worker.h"

/* How a served call ended. The dispatcher (lua/rabibridge/service.lua)
 * returns the first four with the reply body. */
enum {
    RB_OUTCOME_OK,
    RB_OUTCOME_REMOTE_ERROR,
    RB_OUTCOME_INVALID_ARGUMENTS,
    RB_OUTCOME_REFUSED,
    RB_OUTCOME_EXPIRED,
    RB_OUTCOMES,
    /* Left to the broker (the link went): served again, counted then. */
    RB_OUTCOME_REQUEUED = -1
};

typedef struct rb_metrics rb_metrics;
typedef struct rb_metrics_fn rb_metrics_fn;

/* ---- in a worker ---- */

/* The counters of one served function (by name and ftype) in this worker's
 * slot; NULL without metrics or when the slot's table is full. */
rb_metrics_fn *rb_metrics_fn_open(const char *name, const char *ftype);
/* A call starts: counts it in flight; returns the time to pass to done. */
uint64_t rb_metrics_call_start(rb_metrics_fn *fn);
void rb_metrics_call_done(rb_metrics_fn *fn, int outcome, uint64_t started);
/* A request dropped before it ran (its caller's deadline had passed). */
void rb_metrics_call_skipped(rb_metrics_fn *fn);
void rb_metrics_fn_consuming(rb_metrics_fn *fn, int consuming);
/* The function's queue as the broker last reported it. */
void rb_metrics_fn_queue(rb_metrics_fn *fn, uint32_t consumers, uint32_t messages);
int rb_metrics_enabled(void);
void rb_metrics_worker_state(rb_worker_state state, int connected);
void rb_metrics_worker_reconnected(void);

/* ---- in the supervisor ---- */

/* A worker as the supervisor sees it, for /metrics and /readyz. */
typedef struct rb_metrics_worker {
    int slot, id, generation;
    pid_t pid;   /* 0: dead, waiting for a restart */
    int ready;   /* told the supervisor it consumes */
    int current; /* of the generation that serves */
} rb_metrics_worker;

/* Fills out (at most max) with the live worker slots; returns how many.
 * *stopping: the supervisor drains. */
typedef int rb_metrics_list_proc(void *data, rb_metrics_worker *out, int max, int *stopping);

/* Maps the region for nslots slots and listens on "HOST:PORT" (driven by
 * loop). NULL with err set on failure. */
rb_metrics *rb_metrics_open(int nslots, int nworkers, const char *listen, rb_loop *loop,
                            rb_metrics_list_proc *list, void *list_data, char *err, size_t errlen);
void rb_metrics_close(rb_metrics *m);
/* Before forking a worker into slot: a slot taken by another worker (id or
 * generation) hands its per-worker counters to the supervisor's totals; the
 * same worker again is a restart. */
void rb_metrics_slot_start(rb_metrics *m, int slot, int id, int generation);
/* In the forked worker: this process writes slot from now on, and the
 * supervisor's HTTP server is none of its business. */
void rb_metrics_enter_worker(rb_metrics *m, int slot);
/* The port actually bound (for "HOST:0"). */
int rb_metrics_port(const rb_metrics *m);

/* core.metrics_client_call(kind): counts a call this process made as a client. */
int rb_api_metrics_client_call(lua_State *L);
/* Counts a call of this process's client by its outcome: "ok",
 * "remote_error" or an error value's kind. */
void rb_metrics_client_call(const char *kind);

#endif

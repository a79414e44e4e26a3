/* A worker's lifecycle, in one place, as a state machine driven by the loop:
 *
 *   starting --(every function declared)--> serving
 *   serving --(connection lost)--> reconnecting --(back)--> serving
 *   serving | reconnecting --(SIGTERM/SIGINT)--> draining --> stopping
 *
 * Draining stops taking requests, lets the calls in flight finish, and when
 * --drain-timeout runs out cancels the waits still pending, so that each of
 * those calls is answered with an error before the worker exits. A handler
 * that never yields cannot be reached from here: the supervisor kills the
 * worker past its own limit, and those callers get no answer. */
#include "worker.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "bind.h"
#include "log.h"
#include "metrics.h"
#include "server.h"
#include "task.h"
#include "watchdog.h"

typedef enum {
    WORKER_STARTING,
    WORKER_SERVING,
    WORKER_RECONNECTING,
    WORKER_DRAINING,
    WORKER_STOPPING
} worker_state;

static const char *const state_names[] = {"starting", "serving", "reconnecting", "draining", "stopping"};

/* How long the answers of cancelled calls get to go out before the exit. */
#define CANCEL_GRACE_S 2.0

typedef struct {
    rb_sched *sched;
    rb_loop *loop;
    rb_server *srv;
    worker_state state;
    double drain_timeout, drain_deadline, grace_deadline;
    int held;               /* queues kept consumed while their last calls are served */
    double next_hold_check; /* when to ask the broker about them again */
    int waits_cancelled;    /* the drain ran out of time */
    double reconnect_delay;
    rb_timer reconnect_timer;
} worker;

static volatile sig_atomic_t stop_requested;
static int worker_id = -1;
static int ready_fd = -1;
static int abandoned;

static void on_stop_signal(int sig) {
    (void)sig;
    stop_requested = 1;
}

/* No SA_RESTART, so the loop's epoll_wait returns at once and notices. */
static void install_stop_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
}

void rb_worker_prepare(int id, int fd) {
    worker_id = id;
    ready_fd = fd;
    rb_log_set_worker(id);
    install_stop_signals();
}

int rb_worker_abandoned(void) {
    return abandoned;
}

static void enter(worker *w, worker_state state) {
    rb_log(RB_LOG_DEBUG, "worker: %s -> %s", state_names[w->state], state_names[state]);
    w->state = state;
    rb_metrics_worker_state(state_names[state], state != WORKER_RECONNECTING && rb_server_is_open(w->srv));
}

/* Tells the supervisor this worker consumes (once). */
static void notify_ready(void) {
    if (ready_fd < 0) return;
    char one = 1;
    ssize_t n = write(ready_fd, &one, 1);
    (void)n; /* a supervisor that is gone has nothing to learn */
    close(ready_fd);
    ready_fd = -1;
}

/* ---- reconnecting ---- */

static void on_link_lost(void *data, const char *why) {
    worker *w = data;
    (void)why;                              /* the link logged it */
    if (w->state != WORKER_SERVING) return; /* a drain just waits for its calls */
    enter(w, WORKER_RECONNECTING);
    w->reconnect_delay = 0.1;
    rb_log(RB_LOG_WARN, "broker connection lost; reconnecting in %.1f s", w->reconnect_delay);
    rb_timer_start(w->loop, &w->reconnect_timer, w->reconnect_delay);
}

static void on_reconnect_tick(rb_loop *loop, void *data) {
    worker *w = data;
    if (w->state != WORKER_RECONNECTING) return;
    char err[600];
    if (rb_server_reconnect(w->srv, err, sizeof err) == 0) {
        rb_metrics_worker_reconnected();
        enter(w, WORKER_SERVING);
        rb_log(RB_LOG_INFO, "reconnected; serving again");
        return;
    }
    w->reconnect_delay = w->reconnect_delay * 2 > 5 ? 5 : w->reconnect_delay * 2;
    rb_log(RB_LOG_WARN, "reconnection failed: %s; next try in %.1f s", err, w->reconnect_delay);
    rb_timer_start(loop, &w->reconnect_timer, w->reconnect_delay);
}

/* ---- draining ---- */

static void start_drain(worker *w) {
    rb_timer_stop(w->loop, &w->reconnect_timer);
    enter(w, WORKER_DRAINING);
    double now = rb_now_s();
    w->drain_deadline = now + w->drain_timeout;
    w->held = rb_server_cancel(w->srv, 0);
    w->next_hold_check = now + 0.1;
    rb_log(RB_LOG_INFO, "draining: %ld call%s in flight", rb_server_inflight(w->srv),
           rb_server_inflight(w->srv) == 1 ? "" : "s");
}

static void cancel_pending(worker *w) {
    long left = rb_server_inflight(w->srv);
    rb_server_cancel(w->srv, 1);
    w->held = 0;
    w->waits_cancelled = 1;
    w->grace_deadline = rb_now_s() + CANCEL_GRACE_S;
    rb_log(RB_LOG_WARN,
           "drain timed out with %ld call%s in flight: cancelling %s waits, so that %s callers get "
           "an error reply",
           left, left == 1 ? "" : "s", left == 1 ? "its" : "their", left == 1 ? "its" : "their");
    rb_sched_cancel_all(w->sched, "the worker is stopping");
}

static void drain_step(worker *w) {
    double now = rb_now_s();
    long inflight = rb_server_inflight(w->srv);
    if (w->held > 0 && now >= w->next_hold_check) {
        w->held = rb_server_cancel(w->srv, 0);
        w->next_hold_check = now + 0.1;
    }
    if (inflight == 0 && w->held == 0) {
        enter(w, WORKER_STOPPING);
    } else if (!w->waits_cancelled && now >= w->drain_deadline) {
        cancel_pending(w);
    } else if (w->waits_cancelled && now >= w->grace_deadline) {
        abandoned = inflight > 0;
        rb_log(RB_LOG_ERROR,
               "%ld call%s still running after cancellation, left unacked: the broker hands "
               "them to another worker",
               inflight, inflight == 1 ? "" : "s");
        enter(w, WORKER_STOPPING);
    }
}

/* ---- Lua API ---- */

/* core.worker_serve(srv, { drain_timeout = s }) -> true | false (calls were
 * left unanswered). Serves until a stop signal, reconnecting in between. */
int rb_api_worker_serve(lua_State *L) {
    worker w;
    memset(&w, 0, sizeof w);
    w.srv = rb_server_check(L, 1);
    rb_check_options(L, 2, "worker_serve");
    w.drain_timeout = rb_opt_number(L, 2, "worker_serve", "drain_timeout", 30);
    w.sched = rb_sched_of(L);
    w.loop = rb_sched_loop(w.sched);
    w.state = WORKER_STARTING;
    rb_timer_init(&w.reconnect_timer, on_reconnect_tick, &w);
    rb_server_on_lost(w.srv, on_link_lost, &w);
    enter(&w, rb_server_is_open(w.srv) ? WORKER_SERVING : WORKER_RECONNECTING);
    if (w.state == WORKER_RECONNECTING) rb_timer_start(w.loop, &w.reconnect_timer, 0.1);
    rb_watchdog_attach(w.srv, w.loop, rb_sched_state(w.sched));
    notify_ready();
    while (w.state != WORKER_STOPPING) {
        if (stop_requested && w.state != WORKER_DRAINING) start_drain(&w);
        if (w.state == WORKER_DRAINING) drain_step(&w);
        if (w.state == WORKER_STOPPING) break;
        if (rb_loop_run_once(w.loop, w.state == WORKER_DRAINING ? 50 : 1000) < 0 && errno != EINTR) {
            rb_log(RB_LOG_ERROR, "worker: the event loop failed: %s", strerror(errno));
            abandoned = 1;
            break;
        }
    }
    rb_watchdog_detach();
    rb_timer_stop(w.loop, &w.reconnect_timer);
    rb_server_on_lost(w.srv, NULL, NULL);
    lua_pushboolean(L, !abandoned);
    return 1;
}

/* core.process_info() -> { pid =, worker = (-1 outside a worker), cpus = } */
int rb_api_process_info(lua_State *L) {
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, getpid());
    lua_setfield(L, -2, "pid");
    lua_pushinteger(L, worker_id);
    lua_setfield(L, -2, "worker");
    lua_pushinteger(L, sysconf(_SC_NPROCESSORS_ONLN));
    lua_setfield(L, -2, "cpus");
    return 1;
}

/* A worker's lifecycle, in one place, as a state machine driven by the loop:
 *
 *   starting --(every function declared)--> serving
 *   serving --(connection lost)--> reconnecting --(back)--> serving
 *   serving | reconnecting --(SIGTERM/SIGINT)--> draining --> stopping
 *
 * Draining cancels the consumers (the requests still queued wait in the
 * broker for the next worker), lets the calls in flight finish, and shortly
 * before --drain-timeout runs out cancels the waits still pending, so that
 * each of those calls is answered with an error before the worker exits.
 * --drain-timeout is a hard limit: a handler that never yields keeps the
 * loop from exiting, so a timer started with the drain kills the worker
 * then (its unacked requests go back to their queues). A second stop signal
 * from anyone but the supervisor ends the worker at once. */
#include "worker.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bind.h"
#include "gateway.h"
#include "log.h"
#include "metrics.h"
#include "server.h"
#include "task.h"
#include "watchdog.h"

const char *const rb_worker_state_names[RB_WORKER_STATES] = {"starting", "serving", "reconnecting",
                                                             "draining", "stopping"};

/* How long before the hard limit the waits still pending are cancelled,
 * so that their answers go out in time: at most this, at most a fifth of
 * --drain-timeout. The loop gives up on them half-way to the limit. */
#define CANCEL_GRACE_S 1.0

typedef struct {
    rb_sched *sched;
    rb_loop *loop;
    rb_server *srv;
    rb_gateway *http; /* the HTTP gateway the worker runs, if any */
    rb_worker_state state;
    double drain_timeout, cancel_at, exit_at;
    int held;               /* queues kept consumed while their last calls are served */
    double next_hold_check; /* when to ask the broker about them again */
    int waits_cancelled;    /* the drain ran out of time */
    double reconnect_delay;
    rb_timer reconnect_timer;
} worker;

static volatile sig_atomic_t stop_requested;
static volatile sig_atomic_t direct_stops; /* stop signals not from the supervisor */
static pid_t supervisor_pid;
static int worker_id = -1;
static int ready_fd = -1;
static int abandoned;

/* --drain-timeout as a hard limit: a timer that sends SIGKILL, made at
 * start and set by the first stop signal's handler (timer_settime is
 * async-signal-safe), since a handler that never yields keeps the loop
 * from ever starting the drain. A timer rather than the supervisor, so
 * that it holds for a worker signalled directly too. */
static timer_t hard_limit;
static int hard_limit_made;
static double drain_limit_s;
static struct timespec stop_signal_at; /* CLOCK_MONOTONIC */

static void arm_hard_limit(void) {
    if (!hard_limit_made) return;
    double s = drain_limit_s < 0.001 ? 0.001 : drain_limit_s; /* 0 would disarm it */
    struct itimerspec when;
    memset(&when, 0, sizeof when);
    when.it_value.tv_sec = (time_t)s;
    when.it_value.tv_nsec = (long)((s - (double)when.it_value.tv_sec) * 1e9);
    timer_settime(hard_limit, 0, &when, NULL);
}

/* The drain ended in time: closing the Lua state and exiting (a leak
 * checker's report included) must not race the kill. */
static void disarm_hard_limit(void) {
    if (hard_limit_made) timer_delete(hard_limit);
    hard_limit_made = 0;
}

static void make_hard_limit(double drain_timeout) {
    struct sigevent ev;
    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = SIGEV_SIGNAL;
    ev.sigev_signo = SIGKILL;
    drain_limit_s = drain_timeout;
    hard_limit_made = timer_create(CLOCK_MONOTONIC, &ev, &hard_limit) == 0;
    if (!hard_limit_made)
        rb_log(RB_LOG_WARN, "no timer for --drain-timeout (%s): the supervisor's limit applies",
               strerror(errno));
}

/* The supervisor relays its own SIGTERM or Ctrl-C to each worker, which a
 * terminal's Ctrl-C (or systemd's stop) also reaches directly: only the
 * second signal from elsewhere means "now". The worker's own (the
 * watchdog's drain past heap_limit or on the supervisor's death) is no
 * one's second signal. Status 1; the unacked requests go back to their
 * queues when the connection closes. */
static void on_stop_signal(int sig, siginfo_t *si, void *ctx) {
    (void)sig;
    (void)ctx;
    if (si->si_pid != supervisor_pid && si->si_pid != getpid() && ++direct_stops > 1) _exit(1);
    if (stop_requested) return;
    clock_gettime(CLOCK_MONOTONIC, &stop_signal_at);
    arm_hard_limit();
    stop_requested = 1;
}

/* No SA_RESTART, so the loop's epoll_wait returns at once and notices. */
static void install_stop_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_stop_signal;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGTERM);
    sigaddset(&sa.sa_mask, SIGINT);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
}

void rb_worker_prepare(int id, int fd, double drain_timeout) {
    worker_id = id;
    ready_fd = fd;
    supervisor_pid = getppid();
    rb_log_set_worker(id);
    make_hard_limit(drain_timeout);
    install_stop_signals();
}

int rb_worker_abandoned(void) {
    return abandoned;
}

static void enter(worker *w, rb_worker_state state) {
    rb_log(RB_LOG_DEBUG, "worker: %s -> %s", rb_worker_state_names[w->state], rb_worker_state_names[state]);
    w->state = state;
    rb_metrics_worker_state(state, state != RB_WORKER_RECONNECTING && rb_server_is_open(w->srv));
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
    (void)why;                                 /* the link logged it */
    if (w->state != RB_WORKER_SERVING) return; /* a drain just waits for its calls */
    enter(w, RB_WORKER_RECONNECTING);
    w->reconnect_delay = 0.1;
    rb_log(RB_LOG_WARN, "broker connection lost; reconnecting in %.1f s", w->reconnect_delay);
    rb_timer_start(w->loop, &w->reconnect_timer, w->reconnect_delay);
}

static void reconnect_later(worker *w, const char *err) {
    w->reconnect_delay = w->reconnect_delay * 2 > 5 ? 5 : w->reconnect_delay * 2;
    rb_log(RB_LOG_WARN, "reconnection failed: %s; next try in %.1f s", err, w->reconnect_delay);
    rb_timer_start(w->loop, &w->reconnect_timer, w->reconnect_delay);
}

static void on_reconnected(void *data, const char *err) {
    worker *w = data;
    if (w->state != RB_WORKER_RECONNECTING) return;
    if (err) {
        reconnect_later(w, err);
        return;
    }
    rb_metrics_worker_reconnected();
    enter(w, RB_WORKER_SERVING);
    rb_log(RB_LOG_INFO, "reconnected; serving again");
}

/* The connection is made off the loop: calls in flight (a handler waiting
 * on another broker, a sleep) go on while a broker is slow to answer. */
static void on_reconnect_tick(rb_loop *loop, void *data) {
    (void)loop;
    worker *w = data;
    if (w->state != RB_WORKER_RECONNECTING) return;
    char err[600];
    if (rb_server_reconnect_start(w->srv, on_reconnected, w, err, sizeof err) < 0) reconnect_later(w, err);
}

/* ---- draining ---- */

/* Calls being served and HTTP requests being answered. */
static long inflight_of(const worker *w) {
    return rb_server_inflight(w->srv) + (w->http ? rb_gateway_inflight(w->http) : 0);
}

static void start_drain(worker *w) {
    rb_timer_stop(w->loop, &w->reconnect_timer);
    rb_server_reconnect_abandon(w->srv);
    enter(w, RB_WORKER_DRAINING);
    double now = rb_now_s();
    /* Counted from the signal: a handler may have held the loop since. */
    double signalled = (double)stop_signal_at.tv_sec + (double)stop_signal_at.tv_nsec / 1e9;
    double end = (signalled > 0 && signalled <= now ? signalled : now) + w->drain_timeout;
    double grace = w->drain_timeout / 5 < CANCEL_GRACE_S ? w->drain_timeout / 5 : CANCEL_GRACE_S;
    w->cancel_at = end - grace;
    w->exit_at = end - grace / 2;
    w->held = rb_server_cancel(w->srv, 0);
    if (w->http) rb_gateway_quiesce(w->http); /* new connections go to the other workers */
    w->next_hold_check = now + 0.1;
    rb_log(RB_LOG_INFO,
           "draining: %ld call%s in flight, exiting within %g s (a second SIGTERM or SIGINT: at once)",
           inflight_of(w), inflight_of(w) == 1 ? "" : "s", w->drain_timeout);
}

static void cancel_pending(worker *w) {
    long left = inflight_of(w);
    rb_server_cancel(w->srv, 1);
    w->held = 0;
    w->waits_cancelled = 1;
    rb_log(RB_LOG_WARN,
           "drain timed out with %ld call%s in flight: cancelling %s waits, so that %s callers get "
           "an error reply",
           left, left == 1 ? "" : "s", left == 1 ? "its" : "their", left == 1 ? "its" : "their");
    rb_sched_cancel_all(w->sched, "the worker is stopping");
}

static void drain_step(worker *w) {
    double now = rb_now_s();
    long inflight = inflight_of(w);
    if (w->held > 0 && now >= w->next_hold_check) {
        w->held = rb_server_cancel(w->srv, 0);
        w->next_hold_check = now + 0.1;
    }
    if (inflight == 0 && w->held == 0) {
        enter(w, RB_WORKER_STOPPING);
    } else if (!w->waits_cancelled && now >= w->cancel_at) {
        cancel_pending(w);
    } else if (w->waits_cancelled && now >= w->exit_at) {
        abandoned = inflight > 0;
        rb_log(RB_LOG_ERROR,
               "%ld call%s still running after cancellation, left unacked: the broker hands "
               "them to another worker",
               inflight, inflight == 1 ? "" : "s");
        enter(w, RB_WORKER_STOPPING);
    }
}

/* ---- Lua API ---- */

/* core.worker_serve(srv, { drain_timeout = s, http = gateway }) -> true |
 * false (calls were left unanswered). Serves until a stop signal,
 * reconnecting in between; a drain waits for the gateway's requests too. */
int rb_api_worker_serve(lua_State *L) {
    worker w;
    memset(&w, 0, sizeof w);
    w.srv = rb_server_check(L, 1);
    rb_check_options(L, 2, "worker_serve");
    w.drain_timeout = rb_opt_number(L, 2, "worker_serve", "drain_timeout", 30);
    lua_getfield(L, 2, "http");
    if (!lua_isnil(L, -1)) w.http = rb_gateway_check(L, -1);
    lua_pop(L, 1);
    w.sched = rb_sched_of(L);
    w.loop = rb_sched_loop(w.sched);
    w.state = RB_WORKER_STARTING;
    rb_timer_init(&w.reconnect_timer, on_reconnect_tick, &w);
    rb_server_on_lost(w.srv, on_link_lost, &w);
    enter(&w, rb_server_is_open(w.srv) ? RB_WORKER_SERVING : RB_WORKER_RECONNECTING);
    if (w.state == RB_WORKER_RECONNECTING) rb_timer_start(w.loop, &w.reconnect_timer, 0.1);
    rb_watchdog_attach(w.srv, w.loop, rb_sched_state(w.sched));
    notify_ready();
    while (w.state != RB_WORKER_STOPPING) {
        if (stop_requested && w.state != RB_WORKER_DRAINING) start_drain(&w);
        if (w.state == RB_WORKER_DRAINING) drain_step(&w);
        if (w.state == RB_WORKER_STOPPING) break;
        if (rb_loop_run_once(w.loop, w.state == RB_WORKER_DRAINING ? 50 : 1000) < 0 && errno != EINTR) {
            rb_log(RB_LOG_ERROR, "worker: the event loop failed: %s", strerror(errno));
            abandoned = 1;
            break;
        }
    }
    rb_watchdog_detach();
    rb_timer_stop(w.loop, &w.reconnect_timer);
    rb_server_reconnect_abandon(w.srv); /* its done would find w gone */
    rb_server_on_lost(w.srv, NULL, NULL);
    if (!abandoned) disarm_hard_limit();
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

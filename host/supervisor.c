/* The supervisor: forks the workers, restarts those that die (with
 * backoff), reloads by generations, and drains them all on SIGTERM. It
 * waits on one poll() over a signalfd, an inotify descriptor and the
 * workers' ready pipes; each turn of its loop is the steps of
 * supervise_turn(), in order. */
#include "supervisor.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/inotify.h>
#include <sys/signalfd.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bind.h"
#include "log.h"
#include "metrics.h"
#include "notify.h"
#include "watchdog.h"
#include "worker.h"

#define MAX_WORKERS 1024

/* A worker process as the supervisor sees it. During a reload two
 * generations live side by side: the new one starting, the old one serving
 * until every new worker says it consumes, then draining. */
typedef struct {
    int in_use;
    pid_t pid; /* 0 while waiting for a restart */
    int id, generation;
    int ready;    /* the worker wrote to its ready pipe: it consumes */
    int ready_fd; /* our end of that pipe, -1 once read or closed */
    int retiring; /* sent SIGTERM on purpose: do not restart */
    uint64_t started_ms, restart_at_ms;
    int quick_deaths; /* in a row; drives the backoff */
} worker_slot;

typedef struct {
    lua_State *L;
    rb_loop *loop; /* the workers' loop: each child makes it its own */
    int fn_idx, bind_core, nworkers, nslots;
    worker_slot *slots;
    sigset_t old_mask;
    int sigfd, inofd;
    char **watched; /* folder path by inotify watch descriptor */
    int nwatched;
    int current_gen, pending_gen;
    int stopping;
    double drain_timeout;
    uint64_t kill_at, reload_at;
    int ever_ready; /* some worker has consumed: later deaths are restarted */
    int exit_code;
    rb_metrics *metrics; /* --metrics: NULL without */
    rb_loop *http_loop;  /* the supervisor's own loop, for the metrics server */
    int told_ready;      /* systemd has READY=1 for the serving generation */
} supervisor;

static void describe_exit(int status, char *buf, size_t len) {
    if (WIFEXITED(status))
        snprintf(buf, len, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, len, "killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    else
        snprintf(buf, len, "stopped (status 0x%x)", status);
}

static void run_child(supervisor *sv, worker_slot *w, int ready_wr, int strict) {
    close(sv->sigfd);
    if (sv->inofd >= 0) close(sv->inofd);
    for (int i = 0; i < sv->nslots; i++)
        if (sv->slots[i].in_use && sv->slots[i].ready_fd >= 0) close(sv->slots[i].ready_fd);
    sigprocmask(SIG_SETMASK, &sv->old_mask, NULL);
    rb_metrics_enter_worker(sv->metrics, (int)(w - sv->slots));
    rb_loop_free(sv->http_loop);
    sv->http_loop = NULL;
    rb_worker_prepare(w->id, ready_wr, sv->drain_timeout);
    rb_watchdog_child((int)(w - sv->slots));
    if (sv->bind_core) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(w->id % sysconf(_SC_NPROCESSORS_ONLN), &set);
        if (sched_setaffinity(0, sizeof set, &set) < 0)
            rb_log(RB_LOG_WARN, "cannot bind to core %d: %s", w->id, strerror(errno));
    }
    if (rb_loop_after_fork(sv->loop) < 0) {
        rb_log(RB_LOG_ERROR, "cannot create the worker's event loop: %s", strerror(errno));
        _exit(70);
    }
    lua_State *L = sv->L;
    lua_pushvalue(L, sv->fn_idx);
    lua_pushinteger(L, w->id);
    lua_pushboolean(L, strict);
    int code = 0;
    if (lua_pcall(L, 2, 1, 0) != 0) {
        rb_log(RB_LOG_ERROR, "worker failed: %s", lua_tostring(L, -1));
        code = 1;
    } else {
        code = (int)luaL_optinteger(L, -1, 0);
    }
    fflush(NULL);
    if (rb_worker_abandoned()) _exit(code);
    /* The worker's own copy of the state: closing it frees everything, so
     * a leak checker at exit sees only real leaks. */
    lua_close(L);
    exit(code);
}

static void start_worker(supervisor *sv, worker_slot *w, int strict) {
    int fds[2];
    uint64_t now = rb_now_ms();
    w->started_ms = now;
    w->restart_at_ms = 0;
    w->ready = 0;
    if (pipe2(fds, O_CLOEXEC) < 0) {
        rb_log(RB_LOG_ERROR, "cannot create a pipe for worker %d: %s", w->id, strerror(errno));
        w->restart_at_ms = now + 1000;
        return;
    }
    rb_metrics_slot_start(sv->metrics, (int)(w - sv->slots), w->id, w->generation);
    rb_watchdog_reset((int)(w - sv->slots));
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        run_child(sv, w, fds[1], strict);
    }
    close(fds[1]);
    if (pid < 0) {
        close(fds[0]);
        rb_log(RB_LOG_ERROR, "cannot fork worker %d: %s", w->id, strerror(errno));
        w->restart_at_ms = now + 1000;
        return;
    }
    w->pid = pid;
    w->ready_fd = fds[0];
}

static worker_slot *new_slot(supervisor *sv, int id, int generation) {
    for (int i = 0; i < sv->nslots; i++) {
        worker_slot *w = &sv->slots[i];
        if (w->in_use) continue;
        memset(w, 0, sizeof *w);
        w->in_use = 1;
        w->id = id;
        w->generation = generation;
        w->ready_fd = -1;
        return w;
    }
    return NULL;
}

static void release_slot(worker_slot *w) {
    if (w->ready_fd >= 0) close(w->ready_fd);
    w->ready_fd = -1;
    w->in_use = 0;
}

static void start_generation(supervisor *sv, int generation, int strict) {
    for (int id = 0; id < sv->nworkers; id++) {
        worker_slot *w = new_slot(sv, id, generation);
        if (!w) {
            rb_log(RB_LOG_ERROR, "no free worker slot (too many reloads at once?)");
            return;
        }
        start_worker(sv, w, strict);
    }
}

/* SIGTERM every worker of one generation (all when generation < 0). */
static void retire(supervisor *sv, int generation) {
    for (int i = 0; i < sv->nslots; i++) {
        worker_slot *w = &sv->slots[i];
        if (!w->in_use || (generation >= 0 && w->generation != generation)) continue;
        w->retiring = 1;
        if (w->pid > 0)
            kill(w->pid, SIGTERM);
        else
            release_slot(w);
    }
}

static void on_child_exit(supervisor *sv, pid_t pid, int status) {
    for (int i = 0; i < sv->nslots; i++) {
        worker_slot *w = &sv->slots[i];
        if (!w->in_use || w->pid != pid) continue;
        char why[96];
        describe_exit(status, why, sizeof why);
        rb_watchdog_reaped(i, w->id, pid, why);
        w->pid = 0;
        if (sv->stopping || w->retiring) {
            rb_log(RB_LOG_INFO, "worker %d (pid %d, generation %d) %s", w->id, (int)pid, w->generation, why);
            release_slot(w);
        } else if (!sv->ever_ready && w->generation == 1) {
            /* Failing before anything ever served is a set-up problem (broker
             * unreachable, bad credentials, a hook that raises): restarting
             * would only repeat it, so say so once and stop. */
            rb_log(RB_LOG_ERROR, "worker %d %s before serving; stopping (fix the error above)", w->id, why);
            release_slot(w);
            sv->stopping = 1;
            sv->exit_code = WIFEXITED(status) && WEXITSTATUS(status) ? WEXITSTATUS(status) : 1;
            retire(sv, -1);
        } else if (w->generation == sv->pending_gen && !w->ready) {
            rb_log(RB_LOG_ERROR,
                   "reload failed: a new worker %s before serving; the running code keeps serving", why);
            release_slot(w);
            retire(sv, sv->pending_gen);
            sv->pending_gen = 0;
            rb_notify("READY=1");
        } else if (rb_watchdog_wants_successor(i)) {
            /* It drained to give back its memory before we saw it ask. */
            rb_log(RB_LOG_INFO, "worker %d (pid %d) drained to give back its memory; starting its successor",
                   w->id, (int)pid);
            w->restart_at_ms = rb_now_ms();
        } else {
            uint64_t now = rb_now_ms();
            w->quick_deaths = now - w->started_ms < 10000 ? w->quick_deaths + 1 : 0;
            int shift = w->quick_deaths < 10 ? w->quick_deaths - 1 : 9;
            if (shift < 0) shift = 0;
            uint64_t delay = 100u << shift;
            if (delay > 30000) delay = 30000;
            w->restart_at_ms = now + delay;
            rb_log(RB_LOG_WARN, "worker %d (pid %d) %s; restarting in %.1f s", w->id, (int)pid, why,
                   (double)delay / 1000.0);
        }
        return;
    }
}

static void read_ready(supervisor *sv, worker_slot *w) {
    char byte;
    ssize_t n = read(w->ready_fd, &byte, 1);
    if (n < 0 && errno == EINTR) return;
    if (n == 1) w->ready = sv->ever_ready = 1;
    close(w->ready_fd);
    w->ready_fd = -1;
}

/* Once every worker of the pending generation consumes, the old ones drain. */
static void maybe_finish_reload(supervisor *sv) {
    if (!sv->pending_gen) return;
    int ready = 0;
    for (int i = 0; i < sv->nslots; i++) {
        worker_slot *w = &sv->slots[i];
        if (w->in_use && w->generation == sv->pending_gen && w->ready) ready++;
    }
    if (ready < sv->nworkers) return;
    int old = sv->current_gen;
    sv->current_gen = sv->pending_gen;
    sv->pending_gen = 0;
    retire(sv, old);
    rb_notify("READY=1");
    rb_log(RB_LOG_INFO, "reloaded: generation %d serves, generation %d drains", sv->current_gen, old);
}

/* Watches one folder, remembering its path so that folders created in it
 * later can be watched too. */
static void watch_dir(supervisor *sv, const char *dir) {
    int wd = inotify_add_watch(sv->inofd, dir,
                               IN_CLOSE_WRITE | IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM |
                                   IN_DELETE_SELF);
    if (wd < 0) {
        rb_log(RB_LOG_WARN, "--reload: cannot watch %s: %s", dir, strerror(errno));
        return;
    }
    if (wd >= sv->nwatched) {
        int n = wd + 16;
        char **grown = realloc(sv->watched, (size_t)n * sizeof *grown);
        if (!grown) return;
        memset(grown + sv->nwatched, 0, (size_t)(n - sv->nwatched) * sizeof *grown);
        sv->watched = grown;
        sv->nwatched = n;
    }
    free(sv->watched[wd]);
    sv->watched[wd] = strdup(dir);
}

static void setup_watch(supervisor *sv, lua_State *L, int idx) {
    sv->inofd = -1;
    if (lua_isnil(L, idx)) return;
    luaL_checktype(L, idx, LUA_TTABLE);
    sv->inofd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (sv->inofd < 0) {
        rb_log(RB_LOG_ERROR, "--reload: cannot use inotify: %s", strerror(errno));
        return;
    }
    int n = (int)lua_objlen(L, idx);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, i);
        const char *dir = lua_tostring(L, -1);
        if (dir) watch_dir(sv, dir);
        lua_pop(L, 1);
    }
}

/* Drains the inotify events; a folder created (or moved) under a watched
 * one is watched from now on. */
static void read_watch_events(supervisor *sv) {
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    ssize_t len;
    while ((len = read(sv->inofd, buf, sizeof buf)) > 0) {
        for (char *p = buf; p < buf + len;) {
            const struct inotify_event *ev = (const struct inotify_event *)p;
            if ((ev->mask & IN_ISDIR) && (ev->mask & (IN_CREATE | IN_MOVED_TO)) && ev->len &&
                ev->wd < sv->nwatched && sv->watched[ev->wd]) {
                char path[4096];
                snprintf(path, sizeof path, "%s/%s", sv->watched[ev->wd], ev->name);
                watch_dir(sv, path);
            }
            p += sizeof *ev + ev->len;
        }
    }
}

/* SIGTERM/SIGINT begin the drain; the workers get theirs from retire(). */
static void begin_stop(supervisor *sv) {
    int alive = 0;
    for (int i = 0; i < sv->nslots; i++) alive += sv->slots[i].in_use && sv->slots[i].pid > 0;
    sv->stopping = 1;
    rb_notify("STOPPING=1");
    /* Each worker kills itself at --drain-timeout; this is the backstop. */
    sv->kill_at = rb_now_ms() + (uint64_t)(sv->drain_timeout * 1000) + 1000;
    rb_log(RB_LOG_INFO, "draining %d worker%s", alive, alive == 1 ? "" : "s");
    retire(sv, -1);
}

/* A second SIGTERM or Ctrl-C: no more waiting. Unacked requests go back
 * to their queues as the workers' connections close. */
static void stop_at_once(supervisor *sv) {
    rb_log(RB_LOG_WARN, "second stop signal: stopping the workers at once");
    sv->kill_at = rb_now_ms() - 1; /* this turn */
}

static void read_signals(supervisor *sv) {
    struct signalfd_siginfo si;
    while (read(sv->sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
        if ((si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT) && !sv->stopping)
            begin_stop(sv);
        else if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT)
            stop_at_once(sv);
        else if (si.ssi_signo == SIGHUP && !sv->stopping)
            sv->reload_at = rb_now_ms();
    }
}

static void reap_children(supervisor *sv) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) on_child_exit(sv, pid, status);
}

static void start_reload_if_due(supervisor *sv, uint64_t now) {
    if (!sv->reload_at || now < sv->reload_at || sv->stopping) return;
    sv->reload_at = 0;
    if (sv->pending_gen) retire(sv, sv->pending_gen);
    sv->pending_gen = sv->current_gen + 1;
    while (sv->pending_gen <= sv->current_gen) sv->pending_gen++;
    rb_log(RB_LOG_INFO, "change detected: starting generation %d", sv->pending_gen);
    char reloading[64];
    snprintf(reloading, sizeof reloading, "RELOADING=1\nMONOTONIC_USEC=%llu",
             (unsigned long long)now * 1000u);
    rb_notify(reloading);
    start_generation(sv, sv->pending_gen, 1);
}

static void restart_due_workers(supervisor *sv, uint64_t now) {
    for (int i = 0; i < sv->nslots && !sv->stopping; i++) {
        worker_slot *w = &sv->slots[i];
        if (w->in_use && !w->pid && w->restart_at_ms && now >= w->restart_at_ms) start_worker(sv, w, 0);
    }
}

/* --drain-timeout is the workers' own limit; past it and a margin, a
 * worker still alive is stuck in code that never yields. */
static void kill_stuck_drains(supervisor *sv, uint64_t now) {
    if (!sv->stopping || !sv->kill_at || now <= sv->kill_at) return;
    for (int i = 0; i < sv->nslots; i++)
        if (sv->slots[i].in_use && sv->slots[i].pid > 0) kill(sv->slots[i].pid, SIGKILL);
    sv->kill_at = 0;
}

/* READY=1 once every worker of the first generation consumes (reloads say
 * so themselves), and the watchdog's keep-alive when systemd asks for one. */
static void tell_systemd(supervisor *sv, uint64_t now) {
    rb_notify_watchdog(now);
    if (sv->told_ready || sv->stopping) return;
    int ready = 0;
    for (int i = 0; i < sv->nslots; i++)
        ready += sv->slots[i].in_use && sv->slots[i].generation == sv->current_gen && sv->slots[i].ready;
    if (ready < sv->nworkers) return;
    sv->told_ready = 1;
    rb_notify("READY=1");
}

/* The workers as metrics.c needs them for /metrics and /readyz. */
static int list_workers(void *data, rb_metrics_worker *out, int max, int *stopping) {
    supervisor *sv = data;
    int n = 0;
    *stopping = sv->stopping;
    for (int i = 0; i < sv->nslots && n < max; i++) {
        const worker_slot *w = &sv->slots[i];
        if (w->in_use)
            out[n++] = (rb_metrics_worker){i,      w->id,    w->generation,
                                           w->pid, w->ready, w->generation == sv->current_gen};
    }
    return n;
}

static int open_metrics(supervisor *sv, const char *listen, char *err, size_t errlen) {
    sv->http_loop = rb_loop_new();
    if (!sv->http_loop) {
        snprintf(err, errlen, "cannot create the supervisor's event loop");
        return -1;
    }
    sv->metrics =
        rb_metrics_open(sv->nslots, sv->nworkers, listen, sv->http_loop, list_workers, sv, err, errlen);
    if (!sv->metrics) return -1;
    rb_log(RB_LOG_INFO, "metrics on http://%s/metrics (port %d), /healthz, /readyz", listen,
           rb_metrics_port(sv->metrics));
    return 0;
}

/* A worker whose heap passed heap_limit drains by itself; its successor
 * starts now, beside it, as in a reload. */
static void replace_worker(supervisor *sv, worker_slot *w) {
    if (sv->stopping || w->retiring) return;
    w->retiring = 1;
    worker_slot *next = new_slot(sv, w->id, w->generation);
    if (!next) {
        rb_log(RB_LOG_ERROR, "no free worker slot to replace worker %d (pid %d)", w->id, (int)w->pid);
        return;
    }
    rb_log(RB_LOG_INFO, "worker %d (pid %d) drains to give back its memory; starting its successor", w->id,
           (int)w->pid);
    start_worker(sv, next, 0);
}

/* A stalled worker is killed, and restarted as any dead worker is. */
static void watch_workers(supervisor *sv) {
    for (int i = 0; i < sv->nslots; i++) {
        worker_slot *w = &sv->slots[i];
        if (!w->in_use || w->pid <= 0) continue;
        switch (rb_watchdog_inspect(i, w->id, w->pid)) {
        case RB_WATCH_STALLED: kill(w->pid, SIGKILL); break;
        case RB_WATCH_REPLACE: replace_worker(sv, w); break;
        case RB_WATCH_FINE: break;
        }
    }
}

/* One turn: wait for a signal, a file change or a ready worker (100 ms at
 * most, for the timed steps), then act on each. 0 once every worker is
 * gone after a stop. */
static int supervise_turn(supervisor *sv) {
    struct pollfd pfds[3 + 3 * MAX_WORKERS];
    worker_slot *owners[3 + 3 * MAX_WORKERS];
    int npfd = 0, alive = 0;
    pfds[npfd++] = (struct pollfd){sv->sigfd, POLLIN, 0};
    int watch_idx = sv->inofd >= 0 ? npfd : -1;
    if (sv->inofd >= 0) pfds[npfd++] = (struct pollfd){sv->inofd, POLLIN, 0};
    int http_idx = sv->http_loop ? npfd : -1;
    if (sv->http_loop) pfds[npfd++] = (struct pollfd){rb_loop_fd(sv->http_loop), POLLIN, 0};
    int first_ready = npfd;
    for (int i = 0; i < sv->nslots; i++) {
        worker_slot *w = &sv->slots[i];
        if (!w->in_use) continue;
        if (w->pid > 0) alive++;
        if (w->ready_fd >= 0) {
            owners[npfd] = w;
            pfds[npfd++] = (struct pollfd){w->ready_fd, POLLIN, 0};
        }
    }
    if (sv->stopping && alive == 0) return 0;
    if (poll(pfds, (nfds_t)npfd, 100) < 0 && errno != EINTR) return 0;

    read_signals(sv);
    reap_children(sv);
    if (watch_idx >= 0 && (pfds[watch_idx].revents & POLLIN)) {
        read_watch_events(sv);
        /* Editors write a file in several steps: settle before reloading. */
        if (!sv->stopping) sv->reload_at = rb_now_ms() + 300;
    }
    for (int i = first_ready; i < npfd; i++)
        if (pfds[i].revents && owners[i]->ready_fd == pfds[i].fd) read_ready(sv, owners[i]);
    maybe_finish_reload(sv);
    if (http_idx >= 0) rb_loop_run_once(sv->http_loop, 0);
    uint64_t now = rb_now_ms();
    tell_systemd(sv, now);
    start_reload_if_due(sv, now);
    watch_workers(sv);
    restart_due_workers(sv, now);
    kill_stuck_drains(sv, now);
    return 1;
}

static int open_signalfd(supervisor *sv) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigprocmask(SIG_BLOCK, &set, &sv->old_mask);
    sv->sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    return sv->sigfd;
}

static void close_supervisor(supervisor *sv) {
    for (int i = 0; i < sv->nslots; i++)
        if (sv->slots[i].in_use) release_slot(&sv->slots[i]);
    close(sv->sigfd);
    if (sv->inofd >= 0) close(sv->inofd);
    for (int i = 0; i < sv->nwatched; i++) free(sv->watched[i]);
    free(sv->watched);
    sigprocmask(SIG_SETMASK, &sv->old_mask, NULL);
    rb_metrics_close(sv->metrics);
    rb_loop_free(sv->http_loop);
}

/* core.supervise{ workers = N, bind_core = bool, drain_timeout = s, watch = { dir... },
 *                 stall_limit = s, delivery_limit = n, heap_limit = MiB,
 *                 worker = function(id, strict) -> exit code } -> exit code
 * With metrics = "HOST:PORT", serves /metrics, /healthz and /readyz there
 * (nil and a message when it cannot listen).
 * Forks the workers and restarts those that die (after 0.1 s, doubling up
 * to 30 s while they keep dying young). With watch, a change in those
 * folders (or SIGHUP) starts a new generation with the new code and drains
 * the old one once the new one consumes. SIGTERM/SIGINT drain everything.
 * The limits are the watchdog's (host/watchdog.h); 0 turns one off. */
int rb_api_supervise(lua_State *L) {
    static const char fname[] = "supervise";
    luaL_checktype(L, 1, LUA_TTABLE);
    supervisor sv;
    memset(&sv, 0, sizeof sv);
    sv.L = L;
    sv.loop = rb_sched_loop(rb_sched_of(L));
    sv.nworkers = rb_opt_int(L, 1, fname, "workers", 0, MAX_WORKERS, 1);
    sv.bind_core = rb_opt_bool(L, 1, fname, "bind_core", 0);
    sv.drain_timeout = rb_opt_number(L, 1, fname, "drain_timeout", 30);
    rb_watchdog_settings limits = {rb_opt_number(L, 1, fname, "stall_limit", 10),
                                   rb_opt_int(L, 1, fname, "delivery_limit", 0, 1000000, 2),
                                   rb_opt_number(L, 1, fname, "heap_limit", 1024), sv.drain_timeout};
    lua_getfield(L, 1, "worker");
    if (!lua_isfunction(L, -1)) rb_opt_error(L, fname, "worker", "function expected");
    sv.fn_idx = lua_gettop(L);
    rb_opt_table(L, 1, fname, "watch");
    int watch_idx = lua_gettop(L);
    const char *metrics = rb_opt_string(L, 1, fname, "metrics", NULL);
    if (sv.nworkers == 0) sv.nworkers = (int)sysconf(_SC_NPROCESSORS_ONLN);
    sv.nslots = sv.nworkers * 3;
    sv.slots = lua_newuserdata(L, (size_t)sv.nslots * sizeof *sv.slots);
    memset(sv.slots, 0, (size_t)sv.nslots * sizeof *sv.slots);
    char err[300];
    if (metrics && open_metrics(&sv, metrics, err, sizeof err) < 0) {
        rb_metrics_close(sv.metrics);
        rb_loop_free(sv.http_loop);
        lua_pushnil(L);
        lua_pushfstring(L, "--metrics %s: %s", metrics, err);
        return 2;
    }
    if (open_signalfd(&sv) < 0) return luaL_error(L, "supervise: signalfd: %s", strerror(errno));
    setup_watch(&sv, L, watch_idx);
    if (rb_watchdog_open(sv.nslots, &limits) < 0)
        rb_log(RB_LOG_WARN,
               "cannot map the watchdog's shared memory (%s): stalled and poison calls go unwatched",
               strerror(errno));

    sv.current_gen = 1;
    start_generation(&sv, sv.current_gen, 0);
    rb_log(RB_LOG_INFO, "supervisor started %d worker%s%s", sv.nworkers, sv.nworkers == 1 ? "" : "s",
           sv.inofd >= 0 ? ", reloading on changes" : "");
    while (supervise_turn(&sv)) {
    }
    close_supervisor(&sv);
    rb_watchdog_close();
    lua_pushinteger(L, sv.exit_code);
    return 1;
}

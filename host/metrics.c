/* Metrics (see metrics.h): the shared region, the workers' counting, and
 * the supervisor's /metrics, /healthz and /readyz.
 *
 * The region is MAP_SHARED | MAP_ANONYMOUS, mapped by the supervisor before
 * the first fork, so every worker inherits it at the same address. Each
 * worker writes only its own slot, with relaxed atomic stores (single
 * writer: a load and a store, no read-modify-write, no lock); names are
 * written before the count that publishes them (release/acquire). The
 * supervisor writes a slot only while no process runs in it (before a
 * fork): it resets the gauges there and folds the per-worker counters of a
 * slot that changes hands into its own totals. */
#include "metrics.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "http.h"
#include "lauxlib.h"
#include "log.h"

#define MAX_FUNCS 128
#define NBOUNDS 13

/* Prometheus's default buckets, and finer ones below 5 ms, where most
 * calls of a local service fall. */
static const uint64_t bound_us[NBOUNDS] = {1000,   2500,   5000,    10000,   25000,   50000,   100000,
                                           250000, 500000, 1000000, 2500000, 5000000, 10000000};
static const char *const bound_text[NBOUNDS] = {"0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
                                                "0.25",  "0.5",    "1",     "2.5",  "5",     "10"};

static const char *const outcome_names[RB_OUTCOMES] = {"ok", "remote_error", "invalid_arguments", "refused",
                                                       "expired"};

/* What a call made as a client can end in: errors.lua's kinds. */
static const char *const client_outcomes[] = {
    "ok",       "remote_error", "timeout",      "queue_full", "no_route", "connection", "invalid_argument",
    "protocol", "cancelled",    "not_accepted", "other"};
#define NCLIENT (int)(sizeof client_outcomes / sizeof *client_outcomes)

struct rb_metrics_fn {
    char name[232], ftype[8];
    uint32_t served; /* by the process in the slot now (the supervisor clears it) */
    uint32_t consuming;
    uint64_t outcomes[RB_OUTCOMES];
    uint64_t buckets[NBOUNDS + 1]; /* not cumulative: the last is above every bound */
    uint64_t sum_us;
    int64_t inflight;
    uint64_t queue_at_ms; /* when the broker last reported on the queue; 0: never */
    uint32_t consumers, messages;
};

typedef struct {
    uint32_t state, connected, nfuncs;
    uint64_t reconnects;
    uint64_t client[NCLIENT];
    struct rb_metrics_fn fns[MAX_FUNCS];
} slot_t;

struct rb_metrics {
    slot_t *slots;
    size_t maplen;
    int nslots, nworkers;
    int *slot_id, *slot_gen;         /* who ran in each slot last; -1: nobody yet */
    uint64_t *restarts, *reconnects; /* by worker id: the supervisor's own totals */
    rb_http *http;
    rb_metrics_list_proc *list;
    void *list_data;
};

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#define BUMP(x, n) STORE(x, LOAD(x) + (n))

/* The slot this process writes: set in a worker, NULL everywhere else. */
static slot_t *my_slot;

static uint64_t mono_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* ---- in a worker ---- */

int rb_metrics_enabled(void) {
    return my_slot != NULL;
}

rb_metrics_fn *rb_metrics_fn_open(const char *name, const char *ftype) {
    if (!my_slot) return NULL;
    uint32_t n = __atomic_load_n(&my_slot->nfuncs, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n; i++) {
        rb_metrics_fn *fn = &my_slot->fns[i];
        if (strcmp(fn->name, name) == 0 && strcmp(fn->ftype, ftype) == 0) {
            STORE(fn->served, 1);
            return fn;
        }
    }
    if (n == MAX_FUNCS) {
        rb_log(RB_LOG_WARN, "metrics: more than %d functions in one worker; %s is not counted", MAX_FUNCS,
               name);
        return NULL;
    }
    rb_metrics_fn *fn = &my_slot->fns[n];
    snprintf(fn->name, sizeof fn->name, "%s", name);
    snprintf(fn->ftype, sizeof fn->ftype, "%s", ftype);
    fn->served = 1;
    __atomic_store_n(&my_slot->nfuncs, n + 1, __ATOMIC_RELEASE);
    return fn;
}

uint64_t rb_metrics_call_start(rb_metrics_fn *fn) {
    if (!fn) return 0;
    BUMP(fn->inflight, 1);
    return mono_us();
}

void rb_metrics_call_done(rb_metrics_fn *fn, int outcome, uint64_t started) {
    if (!fn) return;
    BUMP(fn->inflight, -1);
    if (outcome == RB_OUTCOME_REQUEUED) return;
    uint64_t us = mono_us() - started;
    int b = 0;
    while (b < NBOUNDS && us > bound_us[b]) b++;
    BUMP(fn->buckets[b], 1);
    BUMP(fn->sum_us, us);
    if (outcome < 0 || outcome >= RB_OUTCOMES) outcome = RB_OUTCOME_REMOTE_ERROR;
    BUMP(fn->outcomes[outcome], 1);
}

void rb_metrics_call_skipped(rb_metrics_fn *fn) {
    if (fn) BUMP(fn->outcomes[RB_OUTCOME_EXPIRED], 1);
}

void rb_metrics_fn_consuming(rb_metrics_fn *fn, int consuming) {
    if (fn) STORE(fn->consuming, (uint32_t)(consuming != 0));
}

void rb_metrics_fn_queue(rb_metrics_fn *fn, uint32_t consumers, uint32_t messages) {
    if (!fn) return;
    STORE(fn->consumers, consumers);
    STORE(fn->messages, messages);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    STORE(fn->queue_at_ms, (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}

void rb_metrics_worker_state(rb_worker_state state, int connected) {
    if (!my_slot) return;
    STORE(my_slot->state, (uint32_t)state);
    STORE(my_slot->connected, (uint32_t)(connected != 0));
}

void rb_metrics_worker_reconnected(void) {
    if (my_slot) BUMP(my_slot->reconnects, 1);
}

/* core.metrics_client_call(kind): "ok", "remote_error" or an error value's kind. */
int rb_api_metrics_client_call(lua_State *L) {
    rb_metrics_client_call(luaL_checkstring(L, 1));
    return 0;
}

void rb_metrics_client_call(const char *kind) {
    if (!my_slot) return;
    int i = 0;
    while (i < NCLIENT - 1 && strcmp(client_outcomes[i], kind) != 0) i++;
    BUMP(my_slot->client[i], 1);
}

/* ---- text for Prometheus ---- */

typedef struct {
    char *p;
    size_t len, cap;
    int failed;
} text;

static void put(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(text *t, const char *fmt, ...) {
    if (t->failed) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(t->p ? t->p + t->len : NULL, t->p ? t->cap - t->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            t->failed = 1;
            return;
        }
        if (t->p && t->len + (size_t)n < t->cap) {
            t->len += (size_t)n;
            return;
        }
        size_t cap = t->cap ? t->cap * 2 : 8192;
        while (cap < t->len + (size_t)n + 1) cap *= 2;
        char *grown = realloc(t->p, cap);
        if (!grown) {
            t->failed = 1;
            return;
        }
        t->p = grown;
        t->cap = cap;
    }
}

static void family(text *t, const char *name, const char *type, const char *help) {
    put(t, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A label value as the text format wants it: \, " and newline escaped.
 * Names of functions cannot hold them, but a format is a format. */
static const char *label(const char *s, char *buf, size_t len) {
    size_t j = 0;
    for (; *s && j + 2 < len; s++) {
        if (*s == '\\' || *s == '"' || *s == '\n') {
            buf[j++] = '\\';
            buf[j++] = *s == '\n' ? 'n' : *s;
        } else {
            buf[j++] = *s;
        }
    }
    buf[j] = '\0';
    return buf;
}

/* One function's numbers over every slot. */
typedef struct {
    const rb_metrics_fn *first;
    uint64_t outcomes[RB_OUTCOMES], buckets[NBOUNDS + 1], sum_us;
    int64_t inflight;
    uint64_t queue_at_ms;
    uint32_t consumers, messages;
} fn_total;

static int find_total(fn_total *tot, int n, const rb_metrics_fn *fn) {
    for (int i = 0; i < n; i++)
        if (strcmp(tot[i].first->name, fn->name) == 0 && strcmp(tot[i].first->ftype, fn->ftype) == 0)
            return i;
    return -1;
}

static int slot_alive(const rb_metrics_worker *ws, int nw, int slot) {
    for (int i = 0; i < nw; i++)
        if (ws[i].slot == slot && ws[i].pid > 0) return 1;
    return 0;
}

static int collect(const rb_metrics *m, const rb_metrics_worker *ws, int nw, fn_total **out) {
    int cap = 16, n = 0;
    fn_total *tot = calloc((size_t)cap, sizeof *tot);
    if (!tot) return -1;
    for (int s = 0; s < m->nslots; s++) {
        const slot_t *sl = &m->slots[s];
        uint32_t nf = __atomic_load_n(&sl->nfuncs, __ATOMIC_ACQUIRE);
        int alive = slot_alive(ws, nw, s);
        for (uint32_t f = 0; f < nf; f++) {
            const rb_metrics_fn *fn = &sl->fns[f];
            int i = find_total(tot, n, fn);
            if (i < 0) {
                if (n == cap) {
                    fn_total *grown = realloc(tot, (size_t)cap * 2 * sizeof *tot);
                    if (!grown) {
                        free(tot);
                        return -1;
                    }
                    tot = grown;
                    cap *= 2;
                }
                i = n++;
                memset(&tot[i], 0, sizeof tot[i]);
                tot[i].first = fn;
            }
            fn_total *t = &tot[i];
            for (int k = 0; k < RB_OUTCOMES; k++) t->outcomes[k] += LOAD(fn->outcomes[k]);
            for (int k = 0; k <= NBOUNDS; k++) t->buckets[k] += LOAD(fn->buckets[k]);
            t->sum_us += LOAD(fn->sum_us);
            if (alive && LOAD(fn->served)) t->inflight += LOAD(fn->inflight);
            uint64_t at = LOAD(fn->queue_at_ms);
            if (at > t->queue_at_ms) {
                t->queue_at_ms = at;
                t->consumers = LOAD(fn->consumers);
                t->messages = LOAD(fn->messages);
            }
        }
    }
    *out = tot;
    return n;
}

enum { GAUGE_INFLIGHT, GAUGE_MESSAGES, GAUGE_CONSUMERS };

/* One gauge per function; the queue's only once a worker has asked the broker. */
static void fn_gauge(text *t, const fn_total *tot, int n, const char *name, const char *help, int which) {
    char a[512], b[32];
    family(t, name, "gauge", help);
    for (int i = 0; i < n; i++) {
        if (which != GAUGE_INFLIGHT && !tot[i].queue_at_ms) continue;
        long long v = which == GAUGE_INFLIGHT   ? (long long)tot[i].inflight
                      : which == GAUGE_MESSAGES ? (long long)tot[i].messages
                                                : (long long)tot[i].consumers;
        put(t, "%s{function=\"%s\",ftype=\"%s\"} %lld\n", name, label(tot[i].first->name, a, sizeof a),
            label(tot[i].first->ftype, b, sizeof b), v);
    }
}

static void render_functions(text *t, const fn_total *tot, int n) {
    char a[512], b[32];
    family(t, "rabihost_calls_total", "counter", "Calls served, by function and outcome.");
    for (int i = 0; i < n; i++)
        for (int k = 0; k < RB_OUTCOMES; k++)
            put(t, "rabihost_calls_total{function=\"%s\",ftype=\"%s\",outcome=\"%s\"} %llu\n",
                label(tot[i].first->name, a, sizeof a), label(tot[i].first->ftype, b, sizeof b),
                outcome_names[k], (unsigned long long)tot[i].outcomes[k]);
    family(t, "rabihost_call_duration_seconds", "histogram",
           "Time from a request's delivery to its reply, by function.");
    for (int i = 0; i < n; i++) {
        label(tot[i].first->name, a, sizeof a);
        label(tot[i].first->ftype, b, sizeof b);
        uint64_t cum = 0;
        for (int k = 0; k < NBOUNDS; k++) {
            cum += tot[i].buckets[k];
            put(t, "rabihost_call_duration_seconds_bucket{function=\"%s\",ftype=\"%s\",le=\"%s\"} %llu\n", a,
                b, bound_text[k], (unsigned long long)cum);
        }
        cum += tot[i].buckets[NBOUNDS];
        put(t, "rabihost_call_duration_seconds_bucket{function=\"%s\",ftype=\"%s\",le=\"+Inf\"} %llu\n", a, b,
            (unsigned long long)cum);
        put(t, "rabihost_call_duration_seconds_sum{function=\"%s\",ftype=\"%s\"} %.6f\n", a, b,
            (double)tot[i].sum_us / 1e6);
        put(t, "rabihost_call_duration_seconds_count{function=\"%s\",ftype=\"%s\"} %llu\n", a, b,
            (unsigned long long)cum);
    }
    fn_gauge(t, tot, n, "rabihost_calls_in_flight", "Calls running now, by function.", GAUGE_INFLIGHT);
    fn_gauge(t, tot, n, "rabihost_queue_messages",
             "Calls waiting in the function's queue, as the broker last reported (queue.declare).",
             GAUGE_MESSAGES);
    fn_gauge(t, tot, n, "rabihost_queue_consumers",
             "Consumers of the function's queue, every server's, as the broker last reported.",
             GAUGE_CONSUMERS);
}

/* Resident memory of pid in bytes, 0 when it cannot be read. */
static unsigned long long resident_bytes(pid_t pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/statm", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    unsigned long long size = 0, resident = 0;
    int ok = fscanf(f, "%llu %llu", &size, &resident) == 2;
    fclose(f);
    return ok ? resident * (unsigned long long)sysconf(_SC_PAGESIZE) : 0;
}

/* The newest live process of worker id, else its newest slot. */
static const rb_metrics_worker *worker_of(const rb_metrics_worker *ws, int nw, int id) {
    const rb_metrics_worker *best = NULL;
    for (int i = 0; i < nw; i++) {
        const rb_metrics_worker *w = &ws[i];
        if (w->id != id) continue;
        if (!best || (w->pid > 0 && best->pid <= 0) ||
            ((w->pid > 0) == (best->pid > 0) && w->generation > best->generation))
            best = w;
    }
    return best;
}

static void render_workers(text *t, const rb_metrics *m, const rb_metrics_worker *ws, int nw) {
    family(t, "rabihost_worker_up", "gauge", "Whether the worker process runs.");
    for (int id = 0; id < m->nworkers; id++) {
        const rb_metrics_worker *w = worker_of(ws, nw, id);
        put(t, "rabihost_worker_up{worker=\"%d\"} %d\n", id, w && w->pid > 0);
    }
    family(t, "rabihost_worker_connected", "gauge", "Whether the worker's broker connection is open.");
    for (int id = 0; id < m->nworkers; id++) {
        const rb_metrics_worker *w = worker_of(ws, nw, id);
        put(t, "rabihost_worker_connected{worker=\"%d\"} %u\n", id,
            w && w->pid > 0 ? LOAD(m->slots[w->slot].connected) : 0u);
    }
    family(t, "rabihost_worker_state", "gauge", "The worker's state: 1 for the one it is in.");
    for (int id = 0; id < m->nworkers; id++) {
        const rb_metrics_worker *w = worker_of(ws, nw, id);
        uint32_t st = w && w->pid > 0 ? LOAD(m->slots[w->slot].state) : 0;
        for (int k = 0; k < RB_WORKER_STATES; k++)
            put(t, "rabihost_worker_state{worker=\"%d\",state=\"%s\"} %d\n", id, rb_worker_state_names[k],
                w && w->pid > 0 && (uint32_t)k == st);
    }
    family(t, "rabihost_worker_reconnects_total", "counter", "Broker connections the worker opened again.");
    for (int id = 0; id < m->nworkers; id++) {
        uint64_t n = m->reconnects[id];
        for (int s = 0; s < m->nslots; s++)
            if (m->slot_id[s] == id) n += LOAD(m->slots[s].reconnects);
        put(t, "rabihost_worker_reconnects_total{worker=\"%d\"} %llu\n", id, (unsigned long long)n);
    }
    family(t, "rabihost_worker_restarts_total", "counter", "Times the supervisor started the worker again.");
    for (int id = 0; id < m->nworkers; id++)
        put(t, "rabihost_worker_restarts_total{worker=\"%d\"} %llu\n", id,
            (unsigned long long)m->restarts[id]);
    family(t, "rabihost_worker_resident_memory_bytes", "gauge", "Resident memory of the worker process.");
    for (int id = 0; id < m->nworkers; id++) {
        const rb_metrics_worker *w = worker_of(ws, nw, id);
        if (w && w->pid > 0)
            put(t, "rabihost_worker_resident_memory_bytes{worker=\"%d\"} %llu\n", id, resident_bytes(w->pid));
    }
}

static void render_client(text *t, const rb_metrics *m) {
    family(t, "rabihost_client_calls_total", "counter", "Calls the workers made as clients, by outcome.");
    for (int k = 0; k < NCLIENT; k++) {
        uint64_t n = 0;
        for (int s = 0; s < m->nslots; s++) n += LOAD(m->slots[s].client[k]);
        put(t, "rabihost_client_calls_total{outcome=\"%s\"} %llu\n", client_outcomes[k],
            (unsigned long long)n);
    }
}

static int list_workers(const rb_metrics *m, rb_metrics_worker **out, int *stopping) {
    *stopping = 0;
    *out = calloc((size_t)m->nslots, sizeof **out);
    if (!*out) return -1;
    return m->list(m->list_data, *out, m->nslots, stopping);
}

static void render(const rb_metrics *m, rb_http_response *out) {
    rb_metrics_worker *ws;
    int stopping;
    int nw = list_workers(m, &ws, &stopping);
    if (nw < 0) return;
    fn_total *tot = NULL;
    int n = collect(m, ws, nw, &tot);
    text t = {0};
    if (n >= 0) {
        render_functions(&t, tot, n);
        render_workers(&t, m, ws, nw);
        render_client(&t, m);
        family(&t, "rabihost_workers", "gauge", "Worker processes the supervisor keeps (-w).");
        put(&t, "rabihost_workers %d\n", m->nworkers);
    }
    free(tot);
    free(ws);
    if (n < 0 || t.failed) {
        free(t.p);
        return;
    }
    out->status = 200;
    out->content_type = "text/plain; version=0.0.4; charset=utf-8";
    out->body = t.p;
    out->len = t.len;
}

/* Ready: not draining, and for every worker id a live process of the
 * serving generation that said it consumes, whose connection is up and
 * whose every function consumes. What is missing goes in the body. */
static void readiness(const rb_metrics *m, rb_http_response *out) {
    rb_metrics_worker *ws;
    int stopping;
    int nw = list_workers(m, &ws, &stopping);
    if (nw < 0) return;
    text t = {0};
    int ready = 0;
    if (stopping) put(&t, "stopping\n");
    for (int id = 0; id < m->nworkers && !stopping; id++) {
        const rb_metrics_worker *w = NULL;
        for (int i = 0; i < nw; i++)
            if (ws[i].id == id && ws[i].current && ws[i].pid > 0) w = &ws[i];
        if (!w) {
            put(&t, "worker %d: not running\n", id);
            continue;
        }
        const slot_t *sl = &m->slots[w->slot];
        uint32_t st = LOAD(sl->state);
        if (!w->ready || st != 1 || !LOAD(sl->connected)) {
            put(&t, "worker %d: %s\n", id, st < (uint32_t)RB_WORKER_STATES ? rb_worker_state_names[st] : "?");
            continue;
        }
        uint32_t nf = __atomic_load_n(&sl->nfuncs, __ATOMIC_ACQUIRE), idle = 0;
        for (uint32_t f = 0; f < nf; f++) {
            const rb_metrics_fn *fn = &sl->fns[f];
            if (LOAD(fn->served) && !LOAD(fn->consuming)) {
                put(&t, "worker %d: %s (%s) does not consume\n", id, fn->name, fn->ftype);
                idle++;
            }
        }
        if (!idle) ready++;
    }
    free(ws);
    int ok = !stopping && ready == m->nworkers;
    if (ok) put(&t, "ready: %d worker%s serving\n", ready, ready == 1 ? "" : "s");
    if (t.failed) {
        free(t.p);
        return;
    }
    out->status = ok ? 200 : 503;
    out->body = t.p;
    out->len = t.len;
}

static void on_http(void *data, const char *path, rb_http_response *out) {
    const rb_metrics *m = data;
    if (strcmp(path, "/metrics") == 0) {
        render(m, out);
    } else if (strcmp(path, "/healthz") == 0) {
        out->status = 200;
        out->body = rb_http_text("ok\n", &out->len);
    } else if (strcmp(path, "/readyz") == 0) {
        readiness(m, out);
    } else {
        out->status = 404;
        out->body = rb_http_text("not found: try /metrics, /healthz or /readyz\n", &out->len);
    }
}

/* ---- in the supervisor ---- */

rb_metrics *rb_metrics_open(int nslots, int nworkers, const char *listen, rb_loop *loop,
                            rb_metrics_list_proc *list, void *list_data, char *err, size_t errlen) {
    rb_metrics *m = calloc(1, sizeof *m);
    if (!m) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    m->nslots = nslots;
    m->nworkers = nworkers;
    m->list = list;
    m->list_data = list_data;
    m->maplen = (size_t)nslots * sizeof(slot_t);
    /* Pages are only backed once touched: a slot costs what its functions use. */
    m->slots = mmap(NULL, m->maplen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    m->slot_id = malloc((size_t)nslots * sizeof *m->slot_id);
    m->slot_gen = malloc((size_t)nslots * sizeof *m->slot_gen);
    m->restarts = calloc((size_t)nworkers, sizeof *m->restarts);
    m->reconnects = calloc((size_t)nworkers, sizeof *m->reconnects);
    if (m->slots == MAP_FAILED || !m->slot_id || !m->slot_gen || !m->restarts || !m->reconnects) {
        snprintf(err, errlen, "cannot map the metrics region: %s", strerror(errno));
        if (m->slots == MAP_FAILED) m->slots = NULL;
        rb_metrics_close(m);
        return NULL;
    }
    for (int i = 0; i < nslots; i++) m->slot_id[i] = m->slot_gen[i] = -1;
    m->http = rb_http_open(loop, listen, on_http, m, err, errlen);
    if (!m->http) {
        rb_metrics_close(m);
        return NULL;
    }
    return m;
}

void rb_metrics_close(rb_metrics *m) {
    if (!m) return;
    rb_http_close(m->http);
    if (m->slots) munmap(m->slots, m->maplen);
    free(m->slot_id);
    free(m->slot_gen);
    free(m->restarts);
    free(m->reconnects);
    free(m);
}

void rb_metrics_slot_start(rb_metrics *m, int slot, int id, int generation) {
    if (!m || slot < 0 || slot >= m->nslots) return;
    slot_t *sl = &m->slots[slot];
    int old = m->slot_id[slot];
    if (old == id && m->slot_gen[slot] == generation) {
        m->restarts[id]++;
    } else if (old >= 0) {
        m->reconnects[old] += sl->reconnects;
        sl->reconnects = 0;
    }
    m->slot_id[slot] = id;
    m->slot_gen[slot] = generation;
    /* Gauges of a process that is gone say nothing of the next one. */
    sl->state = 0;
    sl->connected = 0;
    for (uint32_t f = 0; f < sl->nfuncs; f++) {
        sl->fns[f].served = 0;
        sl->fns[f].consuming = 0;
        sl->fns[f].inflight = 0;
    }
}

void rb_metrics_enter_worker(rb_metrics *m, int slot) {
    if (!m) return;
    rb_http_drop_after_fork(m->http);
    my_slot = &m->slots[slot];
}

int rb_metrics_port(const rb_metrics *m) {
    return rb_http_port(m->http);
}

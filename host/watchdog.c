/* The watchdog (watchdog.h). One MAP_SHARED region, mapped by the
 * supervisor before it forks, holds a slot per worker and a table of
 * records, one per request that was running when its worker died or
 * stalled.
 *
 * Who writes what: a worker writes its own slot only (the call on the CPU,
 * how deep in task resumes it is, whether its loop waits, when it last made
 * progress); the supervisor writes the records, and clears a dead worker's
 * call as it records it, both under the region's sequence lock, so that a
 * worker counting a request's deaths never counts one twice. Workers claim
 * the error replies owed to the callers of stalled calls with a
 * compare-and-swap on the record.
 *
 * Classic queues only say `redelivered`, so the count of deaths is ours: a
 * request redelivered is looked up here (its records, and the slots of
 * workers that died with it and are not reaped yet). */
#include "watchdog.h"

#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "heap.h"
#include "log.h"
#include "loop.h"
#include "server.h"

#define NAME_MAX_LEN 256 /* the link bounds cid and reply_to to 255 bytes */
#define RECORDS 256
#define TICK_S 0.2
#define HEAP_EVERY 5      /* ticks between heap checks */
#define READ_TRIES 1000   /* a writer killed mid-write leaves its lock odd */
#define ORPHAN_MARGIN_S 5 /* past its drain and the grace after it, an orphan is killed */

typedef struct {
    char fn[NAME_MAX_LEN], cid[NAME_MAX_LEN], reply_to[NAME_MAX_LEN];
    int json;
} ident;

typedef struct {
    atomic_uint seq; /* odd while call is written */
    ident call;
    atomic_int has_call;       /* call holds the loop now */
    atomic_int depth;          /* task resumes in progress */
    atomic_int waiting;        /* the loop waits for events */
    _Atomic uint64_t stamp_ms; /* the last sign of progress */
    atomic_int replace;        /* 1: the worker asks for a successor; 2: the supervisor saw it */
    int stall_reported;        /* the supervisor's own: killed for it already */
} slot;

enum { REPLY_NONE, REPLY_OWED, REPLY_SENDING, REPLY_SENT };

typedef struct {
    int used;
    ident call;
    int deaths;   /* its worker died or stalled while it ran */
    int answered; /* its caller got an error reply: never run it again */
    uint64_t at_ms;
    char why[1024]; /* the last death, or the reply owed */
    atomic_int reply;
} record;

typedef struct {
    rb_watchdog_settings settings;
    pid_t supervisor;
    int nslots;
    atomic_uint seq; /* odd while the supervisor writes records */
    record records[RECORDS];
    slot slots[];
} region;

struct rb_watch_call {
    int refs;
    uint64_t serial;
    ident id;
};

static region *shared;
static size_t shared_len;
static slot *mine; /* a worker's own slot */
static int my_index = -1;
static rb_watch_call *current; /* the call holding the loop, in this worker */
static uint64_t shown;         /* the serial of the call written to mine->call */
static uint64_t next_serial;

/* ---- sequence locks ---- */

static void write_begin(atomic_uint *seq) {
    atomic_fetch_add_explicit(seq, 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
}

static void write_end(atomic_uint *seq) {
    atomic_fetch_add_explicit(seq, 1, memory_order_release);
}

/* Spins while a write is under way: -1 after READ_TRIES (its writer died). */
static int read_begin(const atomic_uint *seq, unsigned *at) {
    for (int i = 0; i < READ_TRIES; i++) {
        unsigned v = atomic_load_explicit(seq, memory_order_acquire);
        if (!(v & 1)) {
            *at = v;
            return 0;
        }
    }
    return -1;
}

static int read_retry(const atomic_uint *seq, unsigned at) {
    atomic_thread_fence(memory_order_acquire);
    return atomic_load_explicit(seq, memory_order_relaxed) != at;
}

static uint64_t now_ms(void) {
    return rb_now_ms();
}

static void copy_name(char *dst, const char *src) {
    size_t n = strnlen(src, NAME_MAX_LEN - 1);
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* The names only, not the whole arrays: this runs once per call. */
static void copy_ident(ident *dst, const ident *src) {
    copy_name(dst->fn, src->fn);
    copy_name(dst->cid, src->cid);
    copy_name(dst->reply_to, src->reply_to);
    dst->json = src->json;
}

static int same_call(const ident *a, const char *fn, const char *cid, const char *reply_to) {
    return strcmp(a->cid, cid) == 0 && strcmp(a->reply_to, reply_to) == 0 && strcmp(a->fn, fn) == 0;
}

/* A slot's call, read whole. 0, or -1 when none could be read. */
static int read_slot_call(slot *s, ident *out) {
    for (int i = 0; i < READ_TRIES; i++) {
        unsigned at;
        if (!atomic_load(&s->has_call) || read_begin(&s->seq, &at) < 0) return -1;
        memcpy(out, &s->call, sizeof *out);
        if (!read_retry(&s->seq, at)) return 0;
    }
    return -1;
}

/* ---- the supervisor's side ---- */

int rb_watchdog_open(int nslots, const rb_watchdog_settings *settings) {
    size_t len = sizeof(region) + (size_t)nslots * sizeof(slot);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return -1;
    shared = p; /* mmap zero-fills: every slot idle, every record free */
    shared_len = len;
    shared->settings = *settings;
    shared->supervisor = getpid();
    shared->nslots = nslots;
    return 0;
}

void rb_watchdog_close(void) {
    if (shared) munmap(shared, shared_len);
    shared = NULL;
}

void rb_watchdog_reset(int idx) {
    if (!shared) return;
    slot *s = &shared->slots[idx];
    memset(s, 0, sizeof *s);
}

/* The supervisor died: drain (the worker's SIGTERM handler), and die anyway
 * once the drain has had its time, even in a handler that never yields.
 * Only async-signal-safe calls here. */
static void on_orphaned(int sig) {
    (void)sig;
    alarm((unsigned)(shared->settings.drain_timeout + ORPHAN_MARGIN_S));
    kill(getpid(), SIGTERM);
}

void rb_watchdog_child(int idx) {
    if (!shared) return;
    my_index = idx;
    mine = &shared->slots[idx];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_orphaned;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR2, &sa, NULL);
    prctl(PR_SET_PDEATHSIG, SIGUSR2);
    /* The supervisor may have died between fork and prctl. */
    if (getppid() != shared->supervisor) on_orphaned(SIGUSR2);
}

/* The record of a call, made if new (the oldest goes when all are used). */
static record *record_for(const ident *id) {
    record *oldest = NULL, *oldest_owing = NULL, *free_one = NULL;
    for (int i = 0; i < RECORDS; i++) {
        record *r = &shared->records[i];
        if (!r->used) {
            if (!free_one) free_one = r;
            continue;
        }
        if (same_call(&r->call, id->fn, id->cid, id->reply_to)) return r;
        int owing = atomic_load(&r->reply) == REPLY_OWED || atomic_load(&r->reply) == REPLY_SENDING;
        record **pick = owing ? &oldest_owing : &oldest;
        if (!*pick || r->at_ms < (*pick)->at_ms) *pick = r;
    }
    /* A reply a worker is still to send goes last. */
    record *r = free_one ? free_one : oldest ? oldest : oldest_owing;
    memset(r->why, 0, sizeof r->why);
    r->used = 1;
    r->call = *id;
    r->deaths = 0;
    r->answered = 0;
    atomic_store(&r->reply, REPLY_NONE);
    return r;
}

static const char *plural(int n) {
    return n == 1 ? "" : "s";
}

int rb_watchdog_wants_successor(int idx) {
    int one = 1;
    return shared && atomic_compare_exchange_strong(&shared->slots[idx].replace, &one, 2);
}

rb_watch_state rb_watchdog_inspect(int idx, int worker_id, pid_t pid) {
    if (!shared) return RB_WATCH_FINE;
    slot *s = &shared->slots[idx];
    if (rb_watchdog_wants_successor(idx)) return RB_WATCH_REPLACE;
    double limit = shared->settings.stall_limit;
    if (limit <= 0 || s->stall_reported || atomic_load(&s->depth) == 0 || atomic_load(&s->waiting))
        return RB_WATCH_FINE;
    uint64_t now = now_ms(), stamp = atomic_load(&s->stamp_ms);
    if (stamp > now || (double)(now - stamp) < limit * 1000.0) return RB_WATCH_FINE;
    s->stall_reported = 1;
    double held = (double)(now - stamp) / 1000.0;
    ident id;
    if (read_slot_call(s, &id) < 0) {
        rb_log(RB_LOG_ERROR,
               "worker %d (pid %d) stalled: a task outside any call held its loop for %.1f s "
               "(stall_limit %g s); replacing the worker",
               worker_id, (int)pid, held, limit);
        return RB_WATCH_STALLED;
    }
    write_begin(&shared->seq);
    record *r = record_for(&id);
    r->deaths++;
    r->at_ms = now;
    if (!r->answered) {
        r->answered = 1;
        snprintf(r->why, sizeof r->why,
                 "rabihost: %s (cid %s) held its worker's loop for %.1f s without yielding (stall_limit "
                 "%g s): the worker was replaced and the call abandoned",
                 id.fn, id.cid, held, limit);
        atomic_store(&r->reply, REPLY_OWED);
    }
    atomic_store(&s->has_call, 0);
    write_end(&shared->seq);
    rb_log(RB_LOG_ERROR,
           "worker %d (pid %d) stalled: %s (cid %s, reply_to %s) held its loop for %.1f s (stall_limit "
           "%g s); replacing the worker, and answering its caller with an error",
           worker_id, (int)pid, id.fn, id.cid, id.reply_to, held, limit);
    return RB_WATCH_STALLED;
}

void rb_watchdog_reaped(int idx, int worker_id, pid_t pid, const char *how) {
    if (!shared) return;
    slot *s = &shared->slots[idx];
    if (s->stall_reported) return; /* its call is recorded already */
    ident id;
    /* One try: a worker that died while writing its slot left it torn. */
    unsigned at;
    if (!atomic_load(&s->has_call) || read_begin(&s->seq, &at) < 0) return;
    memcpy(&id, &s->call, sizeof id);
    if (read_retry(&s->seq, at)) return;
    write_begin(&shared->seq);
    record *r = record_for(&id);
    r->deaths++;
    r->at_ms = now_ms();
    int deaths = r->deaths, answered = r->answered;
    if (!answered)
        snprintf(r->why, sizeof r->why, "worker %d (pid %d) %s while running it", worker_id, (int)pid, how);
    atomic_store(&s->has_call, 0);
    write_end(&shared->seq);
    int limit = shared->settings.delivery_limit;
    if (answered || limit <= 0)
        rb_log(RB_LOG_ERROR, "worker %d (pid %d) %s while running %s (cid %s)", worker_id, (int)pid, how,
               id.fn, id.cid);
    else
        rb_log(RB_LOG_ERROR,
               "worker %d (pid %d) %s while running %s (cid %s, reply_to %s): its request has done so "
               "%d time%s; at %d (delivery_limit) it is answered with an error instead of run",
               worker_id, (int)pid, how, id.fn, id.cid, id.reply_to, deaths, plural(deaths), limit);
}

/* ---- a worker's side: the call on the CPU ---- */

int rb_watchdog_armed(void) {
    return mine != NULL;
}

/* Records of calls done, kept for the next ones: one is made and freed
 * per call, and rb_watch_call_new sets every field it has. */
#define SPARE_CALLS 64
static rb_watch_call *spare_calls[SPARE_CALLS];
static int nspare_calls;

rb_watch_call *rb_watch_call_new(const char *fn, const char *cid, const char *reply_to, int json) {
    if (!mine) return NULL;
    rb_watch_call *c = nspare_calls > 0 ? spare_calls[--nspare_calls] : malloc(sizeof *c);
    if (!c) return NULL;
    c->refs = 1;
    c->serial = ++next_serial;
    copy_name(c->id.fn, fn);
    copy_name(c->id.cid, cid);
    copy_name(c->id.reply_to, reply_to);
    c->id.json = json;
    return c;
}

void rb_watch_call_retain(rb_watch_call *c) {
    if (c) c->refs++;
}

void rb_watch_call_release(rb_watch_call *c) {
    if (!c || --c->refs > 0) return;
    if (nspare_calls < SPARE_CALLS)
        spare_calls[nspare_calls++] = c;
    else
        free(c);
}

static void stamp(void) {
    atomic_store_explicit(&mine->stamp_ms, now_ms(), memory_order_relaxed);
}

/* Writes c into the slot when it is not the call written there already. */
static void show(rb_watch_call *c) {
    if (!c) {
        atomic_store(&mine->has_call, 0);
        return;
    }
    if (c->serial != shown) {
        write_begin(&mine->seq);
        copy_ident(&mine->call, &c->id);
        write_end(&mine->seq);
        shown = c->serial;
    }
    atomic_store(&mine->has_call, 1);
}

rb_watch_call *rb_watchdog_enter(rb_watch_call *c) {
    if (!mine) return NULL;
    rb_watch_call *prev = current;
    current = c;
    atomic_fetch_add(&mine->depth, 1);
    stamp();
    show(c);
    return prev;
}

void rb_watchdog_leave(rb_watch_call *prev) {
    if (!mine) return;
    current = prev;
    show(prev);
    stamp();
    atomic_fetch_sub(&mine->depth, 1);
}

rb_verdict rb_watchdog_verdict(const char *fn, const char *cid, const char *reply_to, char *why,
                               size_t whylen) {
    if (!mine) return RB_VERDICT_RUN;
    int deaths = 0, answered = 0, pending = 0;
    char last[sizeof((record *)0)->why] = "";
    for (int tries = 0; tries < READ_TRIES; tries++) {
        unsigned at;
        if (read_begin(&shared->seq, &at) < 0) return RB_VERDICT_RUN;
        deaths = answered = pending = 0;
        last[0] = '\0';
        for (int i = 0; i < RECORDS; i++) {
            const record *r = &shared->records[i];
            if (!r->used || !same_call(&r->call, fn, cid, reply_to)) continue;
            deaths = r->deaths;
            answered = r->answered;
            memcpy(last, r->why, sizeof last);
            last[sizeof last - 1] = '\0';
            break;
        }
        /* A worker that died with it and is not reaped yet still shows it. */
        for (int i = 0; i < shared->nslots; i++) {
            ident id;
            if (i != my_index && read_slot_call(&shared->slots[i], &id) == 0 &&
                same_call(&id, fn, cid, reply_to))
                pending++;
        }
        if (!read_retry(&shared->seq, at)) break;
    }
    if (answered) {
        snprintf(why, whylen, "%s", last);
        return RB_VERDICT_DROP;
    }
    int limit = shared->settings.delivery_limit;
    int total = deaths + pending;
    if (limit <= 0 || total < limit) {
        if (total > 0)
            rb_log(RB_LOG_WARN, "%s: cid %s came back after killing %d worker%s; running it again (%d of %d)",
                   fn, cid, total, plural(total), total + 1, limit);
        return RB_VERDICT_RUN;
    }
    snprintf(why, whylen,
             "rabihost: %s (cid %s) was not run again: its worker died while running it %d time%s "
             "(delivery_limit %d)%s%s",
             fn, cid, total, plural(total), limit, last[0] ? "; the last: " : "", last);
    return RB_VERDICT_REFUSE;
}

/* ---- a worker's side: serving ---- */

/* An error reply, [1, message], in the caller's serialiser. The message is
 * made printable ASCII first: a cid is any bytes, and both serialisers
 * want valid UTF-8. Returns its length. */
static size_t encode_error(int json, const char *message, char *out, size_t cap) {
    char text[1100];
    size_t n = 0;
    for (const char *p = message; *p && n < sizeof text - 1; p++)
        text[n++] = (*p >= 0x20 && *p < 0x7f) ? *p : '?';
    text[n] = '\0';
    if (!json) {
        /* fixarray of 2, positive fixint 1, str 8/16 */
        size_t len = 0;
        out[len++] = (char)0x92;
        out[len++] = 0x01;
        if (n < 256) {
            out[len++] = (char)0xd9;
            out[len++] = (char)n;
        } else {
            out[len++] = (char)0xda;
            out[len++] = (char)(n >> 8);
            out[len++] = (char)(n & 0xff);
        }
        memcpy(out + len, text, n);
        return len + n;
    }
    size_t len = (size_t)snprintf(out, cap, "[1, \"");
    for (size_t i = 0; i < n && len + 8 < cap; i++) {
        if (text[i] == '"' || text[i] == '\\') out[len++] = '\\';
        out[len++] = text[i];
    }
    len += (size_t)snprintf(out + len, cap - len, "\"]");
    return len;
}

typedef struct {
    struct rb_server *srv;
    rb_loop *loop;
    lua_State *L;
    rb_timer tick;
    int ticks;
    int heap_asked; /* asked for a successor already */
    int orphan_told;
} serving;

static serving serve_state;

/* Claims and sends the replies owed to callers of stalled calls. */
static void send_owed(serving *sv) {
    for (int i = 0; i < RECORDS; i++) {
        record *r = &shared->records[i];
        int owed = REPLY_OWED;
        if (atomic_load(&r->reply) != REPLY_OWED ||
            !atomic_compare_exchange_strong(&r->reply, &owed, REPLY_SENDING))
            continue;
        /* The supervisor wrote the record before it marked the reply owed,
         * and leaves it alone while one is owed or being sent. */
        ident id = r->call;
        char body[1200];
        size_t len = encode_error(id.json, r->why, body, sizeof body);
        if (rb_server_send_reply(sv->srv, id.reply_to, id.cid, body, len) < 0) {
            atomic_store(&r->reply, REPLY_OWED);
            return; /* the link is down: the next tick tries again */
        }
        atomic_store(&r->reply, REPLY_SENT);
        rb_log(RB_LOG_INFO, "%s: answered cid %s, whose worker stalled, with an error", id.fn, id.cid);
    }
}

static void check_heap(serving *sv) {
    double limit = shared->settings.heap_limit, mib = 0;
    if (limit <= 0 || sv->heap_asked || !rb_heap_over(sv->L, limit, &mib)) return;
    sv->heap_asked = 1;
    rb_log(RB_LOG_WARN,
           "the Lua heap holds %.0f MiB, past heap_limit (%g MiB): taking no more calls, finishing those "
           "in flight, and handing over to a new worker",
           mib, limit);
    atomic_store(&mine->replace, 1);
    raise(SIGTERM); /* the worker's own drain */
}

static void on_tick(rb_loop *loop, void *data) {
    serving *sv = data;
    send_owed(sv);
    rb_heap_give_back(sv->L);
    if (++sv->ticks % HEAP_EVERY == 0) check_heap(sv);
    if (!sv->orphan_told && getppid() != shared->supervisor) {
        sv->orphan_told = 1;
        rb_log(RB_LOG_WARN, "the supervisor is gone: draining, then exiting");
    }
    rb_timer_start(loop, &sv->tick, TICK_S);
}

static void on_wait(void *data, int waiting) {
    (void)data;
    if (!waiting) stamp();
    atomic_store(&mine->waiting, waiting);
}

void rb_watchdog_attach(struct rb_server *srv, rb_loop *loop, lua_State *L) {
    if (!mine) return;
    serving *sv = &serve_state;
    memset(sv, 0, sizeof *sv);
    sv->srv = srv;
    sv->loop = loop;
    sv->L = L;
    rb_loop_on_wait(loop, on_wait, NULL);
    rb_timer_init(&sv->tick, on_tick, sv);
    rb_timer_start(loop, &sv->tick, 0); /* replies owed since before it started go now */
}

void rb_watchdog_detach(void) {
    serving *sv = &serve_state;
    if (!mine || !sv->loop) return;
    rb_timer_stop(sv->loop, &sv->tick);
    rb_loop_on_wait(sv->loop, NULL, NULL);
    atomic_store(&mine->waiting, 0);
    sv->loop = NULL;
}

/* The serving side of a worker: one link, one channel per function (so that
 * prefetch is per function and a broker error on one queue leaves the others
 * serving), and every delivery run as its own task. The Lua dispatcher turns
 * a request body into a reply body; this file publishes the reply and then
 * acks, so a request is never acked before its answer is out. */
#include "server.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bind.h"
#include "codec.h"
#include "discovery.h"
#include "heap.h"
#include "link.h"
#include "log.h"
#include "metrics.h"
#include "task.h"
#include "trace.h"
#include "watchdog.h"
#include "wire.h"

#define CONTROL_CHANNEL 1
/* An answer ready this close to its caller's deadline is not sent: it
 * could only arrive after the caller's own timeout fired. */
#define LATE_ANSWER_MARGIN_MS 10
/* A scratch buffer grown past this by one large call is let go after it. */
#define SCRATCH_KEEP ((size_t)1 << 20)

/* A function the broker stopped serving (its queue redeclared by a peer
 * with other arguments, deleted, or its channel closed) is declared again
 * after 1 s, then 2, 4, ... up to 30 s: a peer that holds the queue with
 * other arguments may give it up at any time, and retrying for ever at a
 * capped pace costs one round trip per 30 s. */
#define REDECLARE_FIRST_S 1.0
#define REDECLARE_MAX_S 30.0

typedef struct rb_server server;

typedef struct func {
    server *srv;
    amqp_channel_t channel;
    char name[256], queue[256], routing_key[256], consumer_tag[256];
    int fetch_size;
    double queue_size, ttl_ms; /* 0: not set */
    double expires_ms;         /* x-expires; 0: never */
    int auto_delete;
    int quorum;          /* a replicated quorum queue, not a classic one */
    int delivery_limit;  /* quorum: deliveries a request gets; 0: no limit */
    int answers_expired; /* consumes RB_EXPIRED_QUEUE rather than a function's queue */
    int dispatch_ref;
    int consuming;
    int channel_open;
    rb_timer redeclare_timer; /* after the broker cancelled us */
    double redeclare_delay;   /* the next retry's wait */
    unsigned redeclare_tries;
    char redeclare_err[200]; /* the last failure logged: a new one is logged again */
    long inflight;
    rb_metrics_fn *metrics; /* NULL without --metrics */
} func;

struct rb_server {
    rb_sched *sched;
    rb_loop *loop;
    rb_link *link;
    void (*on_lost)(void *data, const char *why);
    void *lost_data;
    int cancelled;  /* consumers cancelled for good: a drain */
    unsigned epoch; /* bumped by every reconnection: delivery tags die with their link */
    char url[1024], name[128];
    rb_tls_options tls;
    int heartbeat;
    double connect_timeout;
    int first_url;                                    /* the node of the URL list to connect to first */
    rb_link_opening *opening;                         /* a link being made off the loop */
    void (*opened)(rb_server *s, const char *err);    /* what follows it, on the loop */
    void (*reconnected)(void *data, const char *err); /* the worker's, for a reconnection */
    void *reconnected_data;
    struct server_open_wait *first_open; /* core.server_open's caller, waiting */
    func **funcs;
    int nfuncs;
    long inflight;
    int closing; /* closed with calls in flight: freed by the last of them */
    size_t compress_threshold, max_body;
    rb_buf scratch;
    struct server_call *spare; /* call records of calls done, for the next ones */
    int nspare;
    rb_timer stats_timer; /* asks the broker about the queues, for the metrics */
    double stats_interval;
    int timeout_dispatch_ref;      /* encodes a timeout answer; LUA_NOREF: none */
    rb_discovery *discovery;       /* answers rabihost list; NULL until srv:answer_discovery */
    amqp_channel_t discovery_chan; /* the channel after the functions' at the time */
};

static void server_free(server *s);
static void on_stats_tick(rb_loop *loop, void *data);

typedef struct server_call {
    func *f;
    struct server_call *next_spare;
    unsigned epoch;
    uint64_t delivery_tag;
    double started; /* rb_now_s() */
    uint64_t metrics_started;
    int64_t deadline_ms; /* the caller's, epoch ms; 0: none */
    int has_correlation_id;
    rb_trace trace; /* the caller's, or a new one when it sent none */
    char reply_to[256], correlation_id[256];
    char timeout_text[]; /* a timeout answer's reason, "" for a call */
} server_call;

/* Call records of calls (not of timeout answers, which carry their
 * reason) are kept for the next calls: one is needed per delivery.
 * start_call sets every field of one it takes. */
#define SPARE_CALLS 256

static server_call *call_take(server *s, size_t whylen) {
    if (whylen == 0 && s->spare) {
        server_call *sc = s->spare;
        s->spare = sc->next_spare;
        s->nspare--;
        return sc;
    }
    return malloc(sizeof(server_call) + whylen + 1);
}

static void call_give_back(server *s, server_call *sc) {
    if (sc && !*sc->timeout_text && s->nspare < SPARE_CALLS) {
        sc->next_spare = s->spare;
        s->spare = sc;
        s->nspare++;
    } else {
        free(sc);
    }
}

/* The trace a request belongs to: its traceparent header, or a new trace
 * (a RabiBridge peer sends none) so that the calls it leads to share one. */
static void request_trace(const rb_message *m, rb_trace *t) {
    if (rb_trace_parse(m->traceparent, strlen(m->traceparent), t) < 0) rb_trace_start(t);
}

/* The field that ties a log line to its call's trace. */
static rb_log_field trace_field(const rb_trace *t) {
    return (rb_log_field){"trace_id", t->trace_id, 0};
}

/* One access log line (when the access log is on): what came of a call. */
static void log_access(const char *function, const char *cid, const rb_trace *t, const char *outcome,
                       double ms) {
    if (!rb_log_access_enabled()) return;
    rb_log_field f[] = {{"function", function, 0}, {"outcome", outcome, 0},      {"duration_ms", NULL, ms},
                        {"cid", cid, 0},           {"trace_id", t->trace_id, 0}, {"span_id", t->span_id, 0}};
    rb_log_access(f, (int)(sizeof f / sizeof f[0]));
}

static void publish_reply(server *s, server_call *sc, const char *body, size_t len) {
    amqp_basic_properties_t props;
    props._flags = 0;
    if (sc->has_correlation_id) {
        props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
        props.correlation_id = amqp_cstring_bytes(sc->correlation_id);
    }
    amqp_table_entry_t why;
    if (*sc->timeout_text) {
        why.key = amqp_cstring_bytes(RB_TIMEOUT_HEADER);
        why.value.kind = AMQP_FIELD_KIND_UTF8;
        why.value.value.bytes = amqp_cstring_bytes(sc->timeout_text);
        props._flags |= AMQP_BASIC_HEADERS_FLAG;
        props.headers = (amqp_table_t){1, &why};
    }
    int z = rb_body_compress(body, len, s->compress_threshold, &s->scratch);
    if (z < 0) {
        rb_log(RB_LOG_ERROR, "%s: cannot compress a reply of %zu bytes", sc->f->name, len);
        return;
    }
    rb_link_publish(s->link, sc->f->channel, "", sc->reply_to, 0, &props, z ? s->scratch.data : body,
                    z ? s->scratch.len : len);
}

/* The metrics' code for an outcome the dispatcher or call_done named. A
 * call that made no reply ("failed", a bug) counts as a remote error. */
static int outcome_code(const char *outcome) {
    static const struct {
        const char *name;
        int code;
    } codes[] = {{"ok", RB_OUTCOME_OK},
                 {"remote_error", RB_OUTCOME_REMOTE_ERROR},
                 {"invalid_arguments", RB_OUTCOME_INVALID_ARGUMENTS},
                 {"refused", RB_OUTCOME_REFUSED},
                 {"expired", RB_OUTCOME_EXPIRED},
                 {"requeued", RB_OUTCOME_REQUEUED}};
    for (size_t i = 0; outcome && i < sizeof codes / sizeof codes[0]; i++)
        if (strcmp(outcome, codes[i].name) == 0) return codes[i].code;
    return RB_OUTCOME_REMOTE_ERROR;
}

static void call_done(rb_task *t, int status, void *data) {
    server_call *sc = data;
    func *f = sc->f;
    server *s = f->srv;
    lua_State *co = rb_task_thread(t);
    size_t len;
    /* The dispatcher returns the reply body and what came of the call. */
    const char *reply = status == 0 ? lua_tolstring(co, -2, &len) : NULL;
    const char *outcome = status == 0 ? lua_tostring(co, -1) : NULL;
    rb_log_field tf = trace_field(&sc->trace);
    if (!rb_link_is_open(s->link)) {
        /* No link: the broker requeues the request and it is served again. */
        outcome = "requeued";
    } else if (sc->deadline_ms && rb_epoch_ms() + LATE_ANSWER_MARGIN_MS >= sc->deadline_ms) {
        /* Its caller has stopped listening, and its own timeout says so:
         * a late answer (often the cancellation its deadline caused, which
         * the timer may fire a millisecond early) would only race that
         * timeout. */
        rb_log_fields(RB_LOG_DEBUG, &tf, 1, "%s: not answering cid %s: its caller gave up %lld ms ago",
                      f->name, sc->correlation_id, (long long)(rb_epoch_ms() - sc->deadline_ms));
        outcome = "expired";
    } else if (reply && outcome) {
        /* After a reconnection the reply still goes out (the caller may be
         * waiting), but the old delivery tag means nothing on the new link. */
        publish_reply(s, sc, reply, len);
        rb_heap_note_body(len);
    } else {
        /* The dispatcher catches handler errors; reaching here is a bug or
         * memory exhaustion. No reply: the caller times out, and we say why. */
        rb_log_fields(RB_LOG_ERROR, &tf, 1, "%s: dispatcher failed (cid %s): %s", f->name, sc->correlation_id,
                      status ? lua_tostring(co, -1) : "no reply body");
        outcome = "failed";
    }
    /* To the microsecond: the clock's own noise is below that. */
    double ms = (double)(long long)((rb_now_s() - sc->started) * 1e6 + 0.5) / 1000.0;
    rb_log_fields(RB_LOG_DEBUG, &tf, 1, "%s: cid %s %s in %.3f ms", f->name, sc->correlation_id, outcome, ms);
    log_access(f->name, sc->correlation_id, &sc->trace, outcome, ms);
    if (rb_link_is_open(s->link) && sc->epoch == s->epoch) rb_link_ack(s->link, f->channel, sc->delivery_tag);
    if (!*sc->timeout_text) rb_metrics_call_done(f->metrics, outcome_code(outcome), sc->metrics_started);
    f->inflight--;
    s->inflight--;
    call_give_back(s, sc);
    if (s->scratch.cap > SCRATCH_KEEP) rb_buf_free(&s->scratch);
    if (s->closing && s->inflight == 0) server_free(s);
}

/* The call as the watchdog names it, with its serialiser: a JSON request
 * is an array, msgpack's starts with a byte that is not '['. */
static rb_watch_call *watch_call(func *f, const rb_message *m, const char *body, size_t len) {
    while (len > 0 && (*body == ' ' || *body == '\t' || *body == '\n' || *body == '\r')) body++, len--;
    return rb_watch_call_new(f->name, m->correlation_id, m->reply_to, len > 0 && *body == '[');
}

/* A request back from a worker that died running it: run it again, answer
 * it with an error (refusal set), or only ack it. 1 when it was acked. */
static int judge_redelivery(rb_link *link, func *f, const rb_message *m, const rb_trace *trace, char *refusal,
                            size_t len) {
    rb_log_field tf = trace_field(trace);
    switch (rb_watchdog_verdict(f->name, m->correlation_id, m->reply_to, refusal, len)) {
    case RB_VERDICT_RUN: refusal[0] = '\0'; return 0;
    case RB_VERDICT_REFUSE:
        rb_log_fields(RB_LOG_ERROR, &tf, 1, "%s: answering cid %s with an error instead of running it: %s",
                      f->name, m->correlation_id, refusal);
        return 0;
    case RB_VERDICT_DROP: break;
    }
    rb_log_fields(RB_LOG_WARN, &tf, 1, "%s: acked cid %s without running it again: %s", f->name,
                  m->correlation_id, refusal);
    log_access(f->name, m->correlation_id, trace, "refused", 0);
    rb_link_ack(link, m->channel, m->delivery_tag);
    return 1;
}

/* A quorum queue's x-delivery-count counts every delivery that ended
 * without an ack: a worker that died running the request, but also one
 * that lost its connection or a node that failed over, which are not the
 * request's fault. The watchdog counts deaths exactly (delivery_limit);
 * the broker's count is the backstop for deaths it cannot see (another
 * host, a restarted supervisor), so it allows this many requeues more. */
#define QUORUM_REQUEUE_SLACK 3

/* 1 (err set) when a quorum queue's request is past its backstop limit;
 * the broker's own x-delivery-limit, one higher, drops it if even that
 * answer never goes out. */
static int past_delivery_limit(const func *f, const rb_message *m, char *err, size_t errlen) {
    if (!f->delivery_limit || m->delivery_count < f->delivery_limit) return 0;
    snprintf(err, errlen,
             "rabihost: %s (cid %s) was not run again: delivered %lld times without an answer (its worker "
             "died or lost its connection each time; delivery_limit %d, plus %d for lost connections)",
             f->name, m->correlation_id, (long long)m->delivery_count,
             f->delivery_limit - QUORUM_REQUEUE_SLACK, QUORUM_REQUEUE_SLACK);
    rb_log(RB_LOG_ERROR, "%s: refused cid %s: %s", f->name, m->correlation_id, err);
    return 1;
}

/* Runs dispatch_ref(body, decode_error, note) for m in a task of its own,
 * which works for m's trace and correlation id; call_done publishes what
 * it returns and then acks m.
 * why is a timeout answer's reason (the request is not run, and note is
 * why), NULL for a call (note is refusal: the watchdog's, or "" to run it). */
static void start_call(func *f, const rb_message *m, const rb_trace *trace, int dispatch_ref, const char *why,
                       const char *refusal) {
    server *s = f->srv;
    size_t whylen = why ? strlen(why) : 0;
    server_call *sc = call_take(s, whylen);
    if (sc) memcpy(sc->timeout_text, why ? why : "", whylen + 1); /* before any call_give_back */
    if (!sc || rb_link_track_delivery(s->link, m->channel, m->delivery_tag) < 0) {
        call_give_back(s, sc);
        rb_log(RB_LOG_ERROR, "%s: out of memory; request left to the broker", f->name);
        return;
    }
    sc->f = f;
    sc->epoch = s->epoch;
    sc->delivery_tag = m->delivery_tag;
    sc->started = rb_now_s();
    sc->trace = *trace;
    /* A timeout answer goes out whatever the clocks say: see on_delivery. */
    sc->deadline_ms = why ? 0 : m->deadline_ms;
    sc->has_correlation_id = m->has_correlation_id;
    /* memcpy, not snprintf: this is per call, and the link already bounded
     * both strings to 255 bytes. */
    memcpy(sc->reply_to, m->reply_to, strlen(m->reply_to) + 1);
    memcpy(sc->correlation_id, m->correlation_id, strlen(m->correlation_id) + 1);
    sc->next_spare = NULL;

    rb_log_field tf = trace_field(trace);
    if (!m->has_correlation_id)
        rb_log_fields(RB_LOG_WARN, &tf, 1, "%s: a request without correlation_id: its reply carries none",
                      f->name);
    lua_State *L = rb_sched_state(s->sched);
    lua_rawgeti(L, LUA_REGISTRYINDEX, dispatch_ref);
    const void *body;
    size_t len;
    char err[160];
    rb_watch_call *watch = NULL;
    if (rb_body_unwrap("request", m->body, m->body_len, s->max_body, &s->scratch, &body, &len, err,
                       sizeof err) == 0) {
        lua_pushlstring(L, body, len);
        lua_pushnil(L);
        rb_heap_note_body(len);
        /* Only a call that runs its handler can stall its worker. */
        if (!why && !*refusal) watch = watch_call(f, m, body, len);
    } else {
        lua_pushnil(L);
        lua_pushstring(L, err);
        rb_log_fields(RB_LOG_WARN, &tf, 1, "%s: refused cid %s: %s", f->name, sc->correlation_id, err);
    }
    /* The trace and the correlation id go to the task, not to the
     * dispatcher: Lua asks for them (trace.current, core.task_cid) only
     * when it logs them. */
    char traceparent[RB_TRACEPARENT_LEN + 1];
    rb_trace_format(trace, traceparent);
    /* A timeout answer was counted as skipped when it was taken. */
    sc->metrics_started = why ? 0 : rb_metrics_call_start(f->metrics);
    if (why)
        lua_pushstring(L, why);
    else if (*refusal)
        lua_pushstring(L, refusal);
    else
        lua_pushnil(L);
    f->inflight++;
    s->inflight++;
    /* The caller's deadline travels as epoch milliseconds; the task's clock
     * is monotonic. */
    rb_task_opts opts = {call_done, sc, 0, watch, traceparent, sc->correlation_id};
    if (sc->deadline_ms) opts.deadline = rb_now_s() + (double)(sc->deadline_ms - rb_epoch_ms()) / 1000.0;
    rb_task *t = rb_task_spawn(s->sched, L, 3, &opts);
    rb_watch_call_release(watch); /* the task holds its own */
    if (t) {
        rb_task_release(t);
    } else {
        if (!why) rb_metrics_call_done(f->metrics, RB_OUTCOME_REFUSED, sc->metrics_started);
        f->inflight--;
        s->inflight--;
        rb_link_ack(s->link, m->channel, m->delivery_tag);
        call_give_back(s, sc);
        rb_log(RB_LOG_ERROR, "%s: out of memory starting a call", f->name);
    }
}

/* Answers m with a timeout error (outcome "expired"), or, with no encoder
 * for one, just acks it. */
static void answer_timeout(func *f, const rb_message *m, const rb_trace *trace, const char *why) {
    server *s = f->srv;
    if (s->timeout_dispatch_ref != LUA_NOREF) {
        start_call(f, m, trace, s->timeout_dispatch_ref, why, "");
        return;
    }
    log_access(f->name, m->correlation_id, trace, "expired", 0);
    rb_link_ack(s->link, m->channel, m->delivery_tag);
}

static func *func_by_queue(const server *s, const char *queue) {
    for (int i = 0; i < s->nfuncs; i++)
        if (strcmp(s->funcs[i]->queue, queue) == 0) return s->funcs[i];
    return NULL;
}

/* A request the broker dead-lettered from a function's queue: no worker
 * took it in time. Which limit ran out is told from its deadline: the
 * client lets it expire at most EXPIRED_BY_CALLER_MS before that. */
#define EXPIRED_BY_CALLER_MS 1100
static void on_expired(func *f, const rb_message *m, const rb_trace *trace) {
    server *s = f->srv;
    const char *queue = *m->death_queue ? m->death_queue : "(unknown)";
    const func *served = func_by_queue(s, queue);
    char why[240];
    if (strcmp(m->death_reason, "expired") != 0) {
        snprintf(why, sizeof why,
                 "the broker dead-lettered the request from queue '%.100s' (%.31s) unanswered", queue,
                 *m->death_reason ? m->death_reason : "no reason given");
    } else if (m->deadline_ms && m->deadline_ms - rb_epoch_ms() < EXPIRED_BY_CALLER_MS) {
        snprintf(why, sizeof why,
                 "no worker took the request from queue '%.100s' before its caller's deadline", queue);
    } else if (served && served->ttl_ms > 0) {
        snprintf(why, sizeof why,
                 "no worker took the request from queue '%.100s' within its timeout (x-message-ttl %.0f ms)",
                 queue, served->ttl_ms);
    } else {
        snprintf(why, sizeof why,
                 "no worker took the request from queue '%.100s' within its timeout (x-message-ttl)", queue);
    }
    rb_log_field tf = trace_field(trace);
    rb_log_fields(RB_LOG_INFO, &tf, 1, "answering cid %s with a timeout: %s", m->correlation_id, why);
    /* Counted for its function when this worker serves it too. */
    if (served) rb_metrics_call_skipped(served->metrics);
    answer_timeout(f, m, trace, why);
}

static void on_delivery(rb_link *link, void *data, const rb_message *m) {
    func *f = data;
    server *s = f->srv;
    if (s->cancelled && !f->consuming) {
        /* Sent before our basic.cancel reached the broker: the next worker
         * serves it. (A consumer a drain holds on to still serves.) */
        rb_link_requeue(link, m->channel, m->delivery_tag);
        return;
    }
    rb_trace trace;
    request_trace(m, &trace);
    rb_log_field tf = trace_field(&trace);
    if (!m->has_reply_to || !*m->reply_to) {
        rb_log_fields(RB_LOG_WARN, &tf, 1, "%s: dropped a request without reply_to (cid '%s')", f->name,
                      m->correlation_id);
        log_access(f->name, m->correlation_id, &trace, "refused", 0);
        rb_link_ack(link, m->channel, m->delivery_tag);
        return;
    }
    if (f->answers_expired) {
        on_expired(f, m, &trace);
        return;
    }
    if (m->deadline_ms && rb_epoch_ms() > m->deadline_ms) {
        /* The broker would have expired it before its deadline by its
         * caller's clock: taken past it by ours, the clocks disagree, and
         * the caller may still be listening. It is not run; it is answered. */
        long long late = (long long)(rb_epoch_ms() - m->deadline_ms);
        rb_log_fields(RB_LOG_INFO, &tf, 1, "%s: skipped cid %s: its caller gave up %lld ms ago", f->name,
                      m->correlation_id, late);
        rb_metrics_call_skipped(f->metrics);
        char why[256];
        snprintf(why, sizeof why,
                 "a worker took the request for '%.100s' %lld ms after its caller's deadline (by the "
                 "worker's clock); it was not run",
                 f->name, late);
        answer_timeout(f, m, &trace, why);
        return;
    }
    char refusal[1100] = "";
    if (m->redelivered && rb_watchdog_armed() &&
        judge_redelivery(link, f, m, &trace, refusal, sizeof refusal))
        return;
    if (!refusal[0] && m->delivery_count) past_delivery_limit(f, m, refusal, sizeof refusal);
    start_call(f, m, &trace, f->dispatch_ref, NULL, refusal);
}

static void on_closed(rb_link *link, void *data, const char *why, int channel_open) {
    (void)link;
    func *f = data;
    f->consuming = 0;
    rb_metrics_fn_consuming(f->metrics, 0);
    f->channel_open = channel_open;
    if (f->srv->cancelled) return; /* draining: nothing to serve again */
    rb_log(RB_LOG_ERROR, "%s: stopped serving: %s; declaring it again in %.0f s", f->name, why,
           REDECLARE_FIRST_S);
    f->redeclare_delay = REDECLARE_FIRST_S;
    f->redeclare_tries = 0;
    f->redeclare_err[0] = 0;
    rb_timer_start(f->srv->loop, &f->redeclare_timer, f->redeclare_delay);
}

/* The worker reconnects: unacked requests go back to their queues meanwhile
 * and are served again. */
static void on_lost(rb_link *link, void *data, const char *why) {
    (void)link;
    server *s = data;
    if (s->on_lost) s->on_lost(s->lost_data, why);
}

static const rb_channel_handler func_handler = {on_delivery, NULL, NULL, on_closed};

/* ---- Lua API ---- */

rb_server *rb_server_check(lua_State *L, int idx) {
    server **sp = luaL_checkudata(L, idx, RB_SERVER_CLASS);
    if (!*sp) luaL_argerror(L, idx, "server already closed");
    return *sp;
}

static server *check_server(lua_State *L) {
    return rb_server_check(L, 1);
}

static const rb_channel_handler control_handler = {NULL, NULL, NULL, NULL};

/* What a new link needs before functions: the control channel and the
 * exchange. It touches the link alone: an opening runs it on its own
 * thread, before the link has a loop. */
static int control_setup(rb_link *link, char *out, size_t outlen, char *err, size_t errlen) {
    (void)out;
    (void)outlen;
    if (rb_link_channel_open(link, CONTROL_CHANNEL, &control_handler, NULL, err, errlen) < 0) return -1;
    return rb_link_declare_rpc_exchange(link, CONTROL_CHANNEL, err, errlen);
}

static void on_server_link(void *data, rb_link *link, const char *out, const char *err) {
    (void)out;
    server *s = data;
    s->opening = NULL;
    if (link) {
        s->link = link;
        rb_link_channel_bind(link, CONTROL_CHANNEL, &control_handler, s);
        rb_link_on_lost(link, on_lost, s);
        rb_link_set_max_body(link, s->max_body);
    }
    s->opened(s, link ? NULL : err);
}

/* Opens a link off the loop (connect, login, control channel, exchange),
 * then calls then(s, NULL) with s->link set, or then(s, why), on the loop.
 * -1 with err set when the opening cannot even start. */
static int server_connect_start(server *s, void (*then)(rb_server *s, const char *err), char *err,
                                size_t errlen) {
    rb_link_options opts = {s->loop, s->url,  s->heartbeat, s->connect_timeout,
                            s->name, &s->tls, s->first_url};
    s->opened = then;
    s->opening = rb_link_open_start(&opts, control_setup, on_server_link, s, err, errlen);
    return s->opening ? 0 : -1;
}

/* core.server_open waits for its link as any wait does (see client.c's
 * open_wait): until pushed, the server is the wait's. */
typedef struct server_open_wait {
    rb_wait wait;
    server *s; /* NULL once the caller has it */
    char err[600];
} server_open_wait;

static void on_first_link(rb_server *s, const char *err) {
    server_open_wait *ow = s->first_open;
    s->first_open = NULL;
    if (err) snprintf(ow->err, sizeof ow->err, "%s", err);
    rb_wait_wake(&ow->wait);
}

static int server_open_push(rb_wait *w, lua_State *L) {
    server_open_wait *ow = (server_open_wait *)w;
    if (!ow->s->link) {
        lua_pushnil(L);
        rb_new_error(L, "connection", ow->err);
        return 2;
    }
    server *s = ow->s;
    ow->s = NULL;
    if (s->stats_interval > 0 && rb_metrics_enabled()) rb_timer_start(s->loop, &s->stats_timer, 0.5);
    server **sp = lua_newuserdata(L, sizeof *sp);
    *sp = s;
    luaL_getmetatable(L, RB_SERVER_CLASS);
    lua_setmetatable(L, -2);
    return 1;
}

static void server_open_detach(rb_wait *w) {
    server_open_wait *ow = (server_open_wait *)w;
    rb_link_open_abandon(ow->s->opening);
    ow->s->opening = NULL;
    ow->s->first_open = NULL;
}

static void server_open_release(rb_wait *w) {
    server_open_wait *ow = (server_open_wait *)w;
    if (ow->s) {
        rb_link_open_abandon(ow->s->opening);
        rb_link_close(ow->s->link);
        server_free(ow->s);
    }
    free(ow);
}

static const rb_wait_ops server_open_ops = {server_open_push, server_open_detach, server_open_release, NULL};

/* core.server_open(url, { heartbeat=, connect_timeout=, compress_threshold=, max_body=, name=, tls=,
 *                         first_url= }) -> server | nil, error
 * url may list a cluster's nodes; first_url (0-based, wrapping) is the one
 * tried first, so that a host's workers spread over them. */
int rb_api_server_open(lua_State *L) {
    static const char fname[] = "server";
    rb_sched *sched = rb_sched_of(L);
    size_t urllen;
    const char *url = luaL_checklstring(L, 1, &urllen);
    luaL_argcheck(L, urllen < 1024, 1, "URL longer than 1023 bytes");
    rb_check_options(L, 2, fname);
    rb_tls_options tls;
    rb_opt_tls(L, 2, fname, &tls);
    const char *name = rb_opt_string(L, 2, fname, "name", "rabihost worker");
    int heartbeat = rb_opt_int(L, 2, fname, "heartbeat", 0, 65535, 60);
    double connect_timeout = rb_opt_number(L, 2, fname, "connect_timeout", 10);
    double stats_interval = rb_opt_number(L, 2, fname, "stats_interval", 0);
    int first_url = rb_opt_int(L, 2, fname, "first_url", 0, 65535, 0);
    size_t threshold, max_body;
    rb_opt_body_limits(L, 2, fname, &threshold, &max_body);
    server *s = calloc(1, sizeof *s);
    server_open_wait *ow = calloc(1, sizeof *ow);
    if (!s || !ow) {
        free(s);
        free(ow);
        return luaL_error(L, "server: out of memory");
    }
    s->sched = sched;
    s->loop = rb_sched_loop(sched);
    s->tls = tls;
    snprintf(s->url, sizeof s->url, "%s", url);
    snprintf(s->name, sizeof s->name, "%s", name);
    s->heartbeat = heartbeat;
    s->connect_timeout = connect_timeout;
    s->first_url = first_url;
    s->compress_threshold = threshold;
    s->max_body = max_body;
    s->timeout_dispatch_ref = LUA_NOREF;
    rb_timer_init(&s->stats_timer, on_stats_tick, s);
    s->stats_interval = stats_interval;
    rb_wait_init(&ow->wait, sched, &server_open_ops);
    ow->s = s;
    s->first_open = ow;
    if (server_connect_start(s, on_first_link, ow->err, sizeof ow->err) < 0) {
        s->first_open = NULL;
        rb_wait_wake(&ow->wait);
    }
    return rb_wait_for(L, &ow->wait);
}

static amqp_field_value_t int_value(double n) {
    amqp_field_value_t v;
    if (n >= -2147483648.0 && n <= 2147483647.0) {
        v.kind = AMQP_FIELD_KIND_I32;
        v.value.i32 = (int32_t)n;
    } else {
        v.kind = AMQP_FIELD_KIND_I64;
        v.value.i64 = (int64_t)n;
    }
    return v;
}

/* A quorum queue's own arguments, after the bounds every queue has: its
 * type, and the broker's delivery limit one above ours (see
 * past_delivery_limit). -> how many were written to args (at most 2) */
static int quorum_arguments(const func *f, amqp_table_entry_t *args) {
    if (!f->quorum) return 0;
    int n = 0;
    args[n].key = amqp_cstring_bytes("x-queue-type");
    args[n].value.kind = AMQP_FIELD_KIND_UTF8;
    args[n++].value.value.bytes = amqp_cstring_bytes("quorum");
    if (f->delivery_limit > 0) {
        args[n].key = amqp_cstring_bytes("x-delivery-limit");
        args[n++].value = int_value(f->delivery_limit + 1.0);
    }
    return n;
}

static amqp_field_value_t string_value(const char *v) {
    amqp_field_value_t fv;
    fv.kind = AMQP_FIELD_KIND_UTF8;
    fv.value.bytes = amqp_cstring_bytes(v);
    return fv;
}

/* How long the expired queue keeps a request for a host to answer, and
 * how many it keeps: bounds for when no host runs. */
#define EXPIRED_QUEUE_TTL_MS 300000
#define EXPIRED_QUEUE_MAX 100000
#define QUEUE_ARGS_MAX 10

/* The arguments f's queue is declared with. An auto-delete queue gets
 * RabiBridge's own, so that a Python server can declare it alike; a
 * durable one also dead-letters what expires in it to RB_EXPIRED_QUEUE (to
 * be answered) and, with expires_ms, goes once unused that long. */
static int queue_arguments(const func *f, amqp_table_entry_t *args) {
    int n = 0;
    if (f->answers_expired) {
        args[n++] =
            (amqp_table_entry_t){amqp_cstring_bytes("x-message-ttl"), int_value(EXPIRED_QUEUE_TTL_MS)};
        args[n++] = (amqp_table_entry_t){amqp_cstring_bytes("x-max-length"), int_value(EXPIRED_QUEUE_MAX)};
        return n;
    }
    args[n++] = (amqp_table_entry_t){amqp_cstring_bytes("x-overflow"), string_value("reject-publish")};
    if (f->ttl_ms > 0)
        args[n++] = (amqp_table_entry_t){amqp_cstring_bytes("x-message-ttl"), int_value(f->ttl_ms)};
    if (f->queue_size > 0)
        args[n++] = (amqp_table_entry_t){amqp_cstring_bytes("x-max-length"), int_value(f->queue_size)};
    n += quorum_arguments(f, args + n);
    if (f->auto_delete) return n;
    args[n++] = (amqp_table_entry_t){amqp_cstring_bytes("x-dead-letter-exchange"), string_value("")};
    args[n++] =
        (amqp_table_entry_t){amqp_cstring_bytes("x-dead-letter-routing-key"), string_value(RB_EXPIRED_QUEUE)};
    if (f->expires_ms > 0)
        args[n++] = (amqp_table_entry_t){amqp_cstring_bytes("x-expires"), int_value(f->expires_ms)};
    return n;
}

static int declare_queue(server *s, func *f, char *err, size_t errlen) {
    amqp_table_entry_t args[QUEUE_ARGS_MAX];
    amqp_table_t table = {queue_arguments(f, args), args};
    amqp_queue_declare(rb_link_conn(s->link), f->channel, amqp_cstring_bytes(f->queue), 0, 1, 0,
                       f->auto_delete, table);
    return rb_link_check_reply(s->link, f->channel, "queue.declare", err, errlen);
}

/* Declares, binds and consumes one function's queue on its own channel.
 * With re_register, a queue declared earlier with other arguments is
 * deleted and declared again; only then, so that re-registering the same
 * arguments never takes a queue (and its waiting calls) from a sibling. */
static int func_declare(server *s, func *f, int re_register, char *err, size_t errlen) {
    if (f->channel > rb_link_channel_max(s->link)) {
        /* The broker would close the whole connection for it. */
        snprintf(err, errlen, "its channel %d is above the broker's channel_max %d", f->channel,
                 rb_link_channel_max(s->link));
        return -1;
    }
    amqp_connection_state_t conn = rb_link_conn(s->link);
    if (!f->channel_open && rb_link_channel_open(s->link, f->channel, &func_handler, f, err, errlen) < 0)
        return -1;
    f->channel_open = 1;
    if (declare_queue(s, f, err, errlen) < 0) {
        f->channel_open = 0; /* the broker closed the channel */
        if (!re_register || !strstr(err, "PRECONDITION_FAILED")) return -1;
        rb_log(RB_LOG_WARN, "%s: %s; re_register: deleting and declaring it again", f->name, err);
        if (rb_link_channel_open(s->link, f->channel, &func_handler, f, err, errlen) < 0) return -1;
        f->channel_open = 1;
        amqp_queue_delete(conn, f->channel, amqp_cstring_bytes(f->queue), 0, 0);
        if (rb_link_check_reply(s->link, f->channel, "queue.delete", err, errlen) < 0 ||
            declare_queue(s, f, err, errlen) < 0) {
            f->channel_open = 0;
            return -1;
        }
    }
    if (!f->answers_expired) {
        amqp_queue_bind(conn, f->channel, amqp_cstring_bytes(f->queue), amqp_cstring_bytes(RB_RPC_EXCHANGE),
                        amqp_cstring_bytes(f->routing_key), amqp_empty_table);
        if (rb_link_check_reply(s->link, f->channel, "queue.bind", err, errlen) < 0) goto closed;
    }
    amqp_basic_qos(conn, f->channel, 0, (uint16_t)f->fetch_size, 0);
    if (rb_link_check_reply(s->link, f->channel, "basic.qos", err, errlen) < 0) goto closed;
    amqp_basic_consume_ok_t *ok = amqp_basic_consume(conn, f->channel, amqp_cstring_bytes(f->queue),
                                                     amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    if (rb_link_check_reply(s->link, f->channel, "basic.consume", err, errlen) < 0) goto closed;
    snprintf(f->consumer_tag, sizeof f->consumer_tag, "%.*s", (int)ok->consumer_tag.len,
             (char *)ok->consumer_tag.bytes);
    f->consuming = 1;
    rb_metrics_fn_consuming(f->metrics, 1);
    return 0;
closed:
    f->channel_open = 0;
    return -1;
}

/* Logs a failed retry when its reason differs from the last one logged, so
 * that a queue held by a peer for hours writes one line, not one a minute. */
static void redeclare_failed(func *f, const char *err) {
    f->redeclare_delay = f->redeclare_delay * 2 > REDECLARE_MAX_S ? REDECLARE_MAX_S : f->redeclare_delay * 2;
    int changed = strncmp(f->redeclare_err, err, sizeof f->redeclare_err - 1) != 0;
    rb_log(changed ? RB_LOG_ERROR : RB_LOG_DEBUG, "%s: not serving: %s; retry %u in %.0f s", f->name, err,
           f->redeclare_tries, f->redeclare_delay);
    size_t n = strlen(err);
    if (n >= sizeof f->redeclare_err) n = sizeof f->redeclare_err - 1;
    memcpy(f->redeclare_err, err, n);
    f->redeclare_err[n] = 0;
    rb_timer_start(f->srv->loop, &f->redeclare_timer, f->redeclare_delay);
}

/* Starts the retries of a function the broker refused (at start, or on a
 * new link), as for one it stopped serving (on_closed); the caller has
 * logged why. The first retry that fails says so again, with the pause
 * before the next; later ones only when their reason changes. */
static void redeclare_start(func *f) {
    f->redeclare_delay = REDECLARE_FIRST_S;
    f->redeclare_tries = 0;
    f->redeclare_err[0] = 0;
    rb_timer_start(f->srv->loop, &f->redeclare_timer, f->redeclare_delay);
}

static void on_redeclare_tick(rb_loop *loop, void *data) {
    (void)loop;
    func *f = data;
    server *s = f->srv;
    if (f->consuming || !rb_link_is_open(s->link) || s->cancelled) return;
    char err[600];
    f->redeclare_tries++;
    if (func_declare(s, f, 0, err, sizeof err) == 0)
        rb_log(RB_LOG_INFO, "%s: serving again after %u tr%s", f->name, f->redeclare_tries,
               f->redeclare_tries == 1 ? "y" : "ies");
    else
        redeclare_failed(f, err);
}

/* srv:serve{ name=, queue=, routing_key=, queue_size=, ttl_ms=, fetch_size=, re_register=,
 *            auto_delete=, queue_type=, delivery_limit=, ftype=,
 *            dispatch=function(body, decode_error, refusal)
 *            -> reply, outcome } -> true | nil, err
 * The dispatcher runs in a task that works for the request's trace and
 * correlation id.
 * refusal: the error to answer instead of running the handler (a poison request). */
static const char *required_string(lua_State *L, int idx, const char *key) {
    const char *v = rb_opt_string(L, idx, "serve", key, "");
    if (!*v) rb_opt_error(L, "serve", key, "a non-empty string expected");
    if (strlen(v) > 255) rb_opt_error(L, "serve", key, "longer than 255 bytes");
    return v;
}

/* queue_type: "classic" (the default) or "quorum". -> 1 for quorum */
static int queue_type_is_quorum(lua_State *L, int idx) {
    const char *type = rb_opt_string(L, idx, "serve", "queue_type", "classic");
    if (strcmp(type, "quorum") == 0) return 1;
    if (strcmp(type, "classic") != 0)
        rb_opt_error(L, "serve", "queue_type", "\"classic\" or \"quorum\" expected");
    return 0;
}

/* A new function of s, consuming on a channel of its own, with the
 * dispatch function of the options at index 2 (raises without one). NULL
 * when s has no link. The caller names it and declares it. */
static func *add_func(lua_State *L, server *s, const char *fname) {
    lua_getfield(L, 2, "dispatch");
    if (!lua_isfunction(L, -1)) rb_opt_error(L, fname, "dispatch", "function expected");
    if (!rb_link_is_open(s->link)) return NULL;
    func **grown = realloc(s->funcs, (size_t)(s->nfuncs + 1) * sizeof *grown);
    func *f = calloc(1, sizeof *f);
    if (!grown || !f) {
        free(f);
        if (grown) s->funcs = grown;
        luaL_error(L, "out of memory");
    }
    s->funcs = grown;
    f->srv = s;
    f->channel = (amqp_channel_t)(CONTROL_CHANNEL + 1 + s->nfuncs);
    rb_timer_init(&f->redeclare_timer, on_redeclare_tick, f);
    f->dispatch_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    s->funcs[s->nfuncs++] = f;
    return f;
}

static int api_serve(lua_State *L) {
    static const char fname[] = "serve";
    server *s = check_server(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    const char *name = required_string(L, 2, "name");
    const char *queue = required_string(L, 2, "queue");
    const char *rk = required_string(L, 2, "routing_key");
    int fetch = rb_opt_int(L, 2, fname, "fetch_size", 0, 65535, 0);
    int re_register = rb_opt_bool(L, 2, fname, "re_register", 0);
    double queue_size = rb_opt_number(L, 2, fname, "queue_size", 0);
    double ttl_ms = rb_opt_number(L, 2, fname, "ttl_ms", 0);
    int quorum = queue_type_is_quorum(L, 2);
    int auto_delete = rb_opt_bool(L, 2, fname, "auto_delete", 0);
    if (quorum && auto_delete)
        rb_opt_error(L, fname, "auto_delete", "false for a quorum queue (RabbitMQ refuses it)");
    int delivery_limit = rb_opt_int(L, 2, fname, "delivery_limit", 0, 1000000, 0);
    double expires_ms = rb_opt_number(L, 2, fname, "expires_ms", 0);
    const char *ftype = rb_opt_string(L, 2, fname, "ftype", "async");
    if (s->discovery) return luaL_error(L, "serve: called after answer_discovery");
    func *f = add_func(L, s, fname);
    if (!f) return rb_fail(L, "connection", "%s", rb_link_error(s->link));
    snprintf(f->name, sizeof f->name, "%s", name);
    snprintf(f->queue, sizeof f->queue, "%s", queue);
    snprintf(f->routing_key, sizeof f->routing_key, "%s", rk);
    f->fetch_size = fetch;
    f->queue_size = queue_size > 0 ? queue_size : 0;
    f->ttl_ms = ttl_ms > 0 ? ttl_ms : 0;
    f->auto_delete = auto_delete;
    f->expires_ms = expires_ms > 0 ? expires_ms : 0;
    f->quorum = quorum;
    f->delivery_limit = quorum && delivery_limit ? delivery_limit + QUORUM_REQUEUE_SLACK : 0;
    f->metrics = rb_metrics_fn_open(name, ftype);
    char err[600];
    if (func_declare(s, f, re_register, err, sizeof err) < 0) {
        /* Refused on a live link (a peer holds the queue with other
         * arguments): declared again with a growing pause until it is
         * served, and the third result says so. A lost link declares it
         * with every other function once it is back. */
        int retrying = rb_link_is_open(s->link) && !s->cancelled;
        if (retrying) redeclare_start(f);
        rb_fail(L, "broker", "%s", err);
        lua_pushboolean(L, retrying);
        return 3;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* srv:answer_timeouts{ dispatch = function(body, decode_error, why) -> reply, outcome }
 * -> true | nil, err. Consumes RB_EXPIRED_QUEUE, answering each request
 * there with a timeout error; requests taken past their caller's deadline
 * are answered so too. dispatch encodes the error reply. */
static int api_answer_timeouts(lua_State *L) {
    static const char fname[] = "answer_timeouts";
    server *s = check_server(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    if (s->timeout_dispatch_ref != LUA_NOREF) return luaL_error(L, "answer_timeouts: called twice");
    func *f = add_func(L, s, fname);
    if (!f) return rb_fail(L, "connection", "%s", rb_link_error(s->link));
    snprintf(f->name, sizeof f->name, "%s", RB_EXPIRED_QUEUE); /* one word in key=value logs */
    snprintf(f->queue, sizeof f->queue, "%s", RB_EXPIRED_QUEUE);
    f->fetch_size = 64;
    f->answers_expired = 1;
    s->timeout_dispatch_ref = f->dispatch_ref;
    char err[600];
    if (func_declare(s, f, 0, err, sizeof err) < 0) return rb_fail(L, "broker", "%s", err);
    lua_pushboolean(L, 1);
    return 1;
}

/* Answers rabihost list on this link (discovery.c). A failure costs the
 * listing, never the serving: it is logged, and tried again with the next
 * link. */
static void attach_discovery(server *s) {
    if (!s->discovery || !rb_link_is_open(s->link) || s->cancelled) return;
    if (s->discovery_chan > rb_link_channel_max(s->link)) {
        rb_log(RB_LOG_WARN,
               "discovery: rabihost list will not see this worker: its channel %d is above the "
               "broker's channel_max %d",
               s->discovery_chan, rb_link_channel_max(s->link));
        return;
    }
    char err[600];
    if (rb_discovery_attach(s->discovery, s->link, s->discovery_chan, err, sizeof err) < 0)
        rb_log(RB_LOG_WARN, "discovery: rabihost list will not see this worker: %s", err);
}

/* srv:answer_discovery(answer): answers every discovery request with the
 * bytes of answer (JSON describing the functions served), from now on and
 * after each reconnection. Call it after the last srv:serve. */
static int api_answer_discovery(lua_State *L) {
    server *s = check_server(L);
    size_t len;
    const char *answer = luaL_checklstring(L, 2, &len);
    if (s->discovery) return luaL_error(L, "answer_discovery: already answering");
    s->discovery = rb_discovery_new(answer, len);
    if (!s->discovery) return luaL_error(L, "answer_discovery: out of memory");
    s->discovery_chan = (amqp_channel_t)(CONTROL_CHANNEL + 1 + s->nfuncs);
    attach_discovery(s);
    lua_pushboolean(L, 1);
    return 1;
}

/* The new link is open (or not): every function is declared and consumed
 * again. These declares run on the loop, one round trip each: the broker
 * has just answered the login and the control channel's set-up, so it is
 * live; should it freeze in between, the first declare to time out loses
 * the link and the rest are not tried. */
static void on_relinked(rb_server *s, const char *err) {
    char why[600];
    if (!err) {
        for (int i = 0; i < s->nfuncs && rb_link_is_open(s->link); i++) {
            func *f = s->funcs[i];
            f->channel_open = 0; /* channels died with the old link */
            f->consuming = 0;
            if (func_declare(s, f, 0, why, sizeof why) < 0 && rb_link_is_open(s->link)) {
                rb_log(RB_LOG_ERROR, "%s: not serving: %s; declaring it again in %.0f s", f->name, why,
                       REDECLARE_FIRST_S);
                redeclare_start(f);
            }
        }
        attach_discovery(s);
        if (!rb_link_is_open(s->link)) {
            snprintf(why, sizeof why, "%s", rb_link_error(s->link));
            err = why;
        }
    }
    if (s->reconnected) s->reconnected(s->reconnected_data, err);
}

int rb_server_reconnect_start(rb_server *s, void (*done)(void *data, const char *err), void *data, char *err,
                              size_t errlen) {
    if (s->opening) return 0; /* one is under way already: it reports to done */
    /* Another node first: the one lost may be down (a cluster's node that
     * died), and trying it again would only delay serving. */
    if (s->link) s->first_url = rb_link_url_index(s->link) + 1;
    rb_link_close(s->link);
    s->link = NULL;
    s->epoch++;
    s->reconnected = done;
    s->reconnected_data = data;
    return server_connect_start(s, on_relinked, err, errlen);
}

static void cancel_consumer(server *s, func *f) {
    amqp_basic_cancel(rb_link_conn(s->link), f->channel, amqp_cstring_bytes(f->consumer_tag));
    char err[600];
    if (rb_link_check_reply(s->link, f->channel, "basic.cancel", err, sizeof err) < 0)
        rb_log(RB_LOG_WARN, "%s: %s", f->name, err);
    f->consuming = 0;
    rb_metrics_fn_consuming(f->metrics, 0);
}

/* Asks the broker how many consumers and ready messages f's queue has.
 * 0, or -1 when the passive declare failed (the queue is gone). */
static int queue_counts(server *s, func *f, uint32_t *consumers, uint32_t *ready) {
    amqp_queue_declare_ok_t *ok = amqp_queue_declare(
        rb_link_conn(s->link), f->channel, amqp_cstring_bytes(f->queue), 1, 0, 0, 0, amqp_empty_table);
    char err[600];
    if (rb_link_check_reply(s->link, f->channel, "queue.declare (passive)", err, sizeof err) < 0) {
        f->channel_open = 0;
        f->consuming = 0;
        rb_metrics_fn_consuming(f->metrics, 0);
        return -1;
    }
    *consumers = ok->consumer_count;
    *ready = ok->message_count;
    return 0;
}

/* For the metrics: each consumed queue's depth and consumers, every
 * stats_interval seconds, from a passive queue.declare (one round trip per
 * function; the broker's answer is the only count there is). */
static void on_stats_tick(rb_loop *loop, void *data) {
    server *s = data;
    for (int i = 0; i < s->nfuncs && rb_link_is_open(s->link) && !s->cancelled; i++) {
        func *f = s->funcs[i];
        uint32_t consumers, ready;
        if (!f->consuming || f->answers_expired) continue; /* no metrics of its own */
        if (queue_counts(s, f, &consumers, &ready) == 0)
            rb_metrics_fn_queue(f->metrics, consumers, ready);
        else
            rb_timer_start(loop, &f->redeclare_timer, 1.0); /* the queue went: declare it again */
    }
    if (!s->cancelled) rb_timer_start(loop, &s->stats_timer, s->stats_interval);
}

int rb_server_send_reply(rb_server *s, const char *reply_to, const char *cid, const void *body, size_t len) {
    if (!rb_link_is_open(s->link)) return -1;
    amqp_basic_properties_t props;
    props._flags = AMQP_BASIC_CORRELATION_ID_FLAG;
    props.correlation_id = amqp_cstring_bytes(cid);
    return rb_link_publish(s->link, CONTROL_CHANNEL, "", reply_to, 0, &props, body, len);
}

void rb_server_reconnect_abandon(rb_server *s) {
    rb_link_open_abandon(s->opening);
    s->opening = NULL;
    s->reconnected = NULL;
}

int rb_server_cancel(rb_server *s, int force) {
    int held = 0;
    s->cancelled = 1;
    rb_server_reconnect_abandon(s); /* a drain serves nothing new */
    rb_discovery_stop(s->discovery);
    for (int i = 0; i < s->nfuncs; i++) {
        func *f = s->funcs[i];
        rb_timer_stop(s->loop, &f->redeclare_timer);
        if (!f->consuming || !rb_link_is_open(s->link)) continue;
        uint32_t consumers = 0, ready = 0;
        if (!force && f->auto_delete && queue_counts(s, f, &consumers, &ready) == 0 && consumers <= 1 &&
            (ready > 0 || f->inflight > 0)) {
            held++;
            continue;
        }
        if (f->consuming) cancel_consumer(s, f);
    }
    return held;
}

long rb_server_inflight(const rb_server *s) {
    return s->inflight;
}

int rb_server_is_open(const rb_server *s) {
    return rb_link_is_open(s->link);
}

void rb_server_on_lost(rb_server *s, void (*proc)(void *data, const char *why), void *data) {
    s->on_lost = proc;
    s->lost_data = data;
}

static int api_inflight(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)rb_server_inflight(check_server(L)));
    return 1;
}

/* srv:max_functions() -> how many functions this link can serve: one
 * channel each below the broker's channel_max, besides the control
 * channel, the expired requests' and discovery's. */
static int api_max_functions(lua_State *L) {
    server *s = check_server(L);
    lua_pushinteger(L, rb_link_channel_max(s->link) - 3);
    lua_pushinteger(L, rb_link_channel_max(s->link));
    return 2;
}

static int api_is_open(lua_State *L) {
    lua_pushboolean(L, rb_server_is_open(check_server(L)));
    return 1;
}

static void server_free(server *s) {
    lua_State *L = rb_sched_state(s->sched);
    rb_timer_stop(s->loop, &s->stats_timer);
    for (int i = 0; i < s->nfuncs; i++) {
        rb_timer_stop(s->loop, &s->funcs[i]->redeclare_timer);
        luaL_unref(L, LUA_REGISTRYINDEX, s->funcs[i]->dispatch_ref);
        free(s->funcs[i]);
    }
    free(s->funcs);
    while (s->spare) {
        server_call *sc = s->spare;
        s->spare = sc->next_spare;
        free(sc);
    }
    rb_discovery_free(s->discovery);
    rb_buf_free(&s->scratch);
    free(s);
}

/* srv:close(): the link goes now; calls still in flight keep the rest until
 * the last of them is done. */
static int api_server_close(lua_State *L) {
    server **sp = luaL_checkudata(L, 1, RB_SERVER_CLASS);
    server *s = *sp;
    if (!s) return 0;
    *sp = NULL;
    rb_timer_stop(s->loop, &s->stats_timer);
    rb_server_reconnect_abandon(s);
    rb_link_close(s->link);
    s->link = NULL;
    if (s->inflight > 0)
        s->closing = 1;
    else
        server_free(s);
    return 0;
}

int rb_api_server_gc(lua_State *L) {
    return api_server_close(L);
}

const luaL_Reg rb_server_methods[] = {{"serve", api_serve},
                                      {"answer_timeouts", api_answer_timeouts},
                                      {"answer_discovery", api_answer_discovery},
                                      {"inflight", api_inflight},
                                      {"is_open", api_is_open},
                                      {"max_functions", api_max_functions},
                                      {"close", api_server_close},
                                      {NULL, NULL}};

/* The RPC client: one link; on it a channel consuming a server-named
 * exclusive reply queue without acks, and a channel publishing in confirm
 * mode. client:call() publishes a request and waits (yields, or drives the
 * loop) for whichever comes first: the reply, a nack (queue full), a return
 * (no route), the timeout, or the loss of the connection. The request is
 * written and a plain reply read here, in the client's serialiser, straight
 * between Lua values and the wire: a call makes no Lua string on its way
 * (the Lua layer decodes only replies of another shape). Bodies are
 * compressed above the threshold and decompressed on arrival.
 *
 * Why publishing has a channel of its own, and sometimes a new one: a
 * channel's first publish to a quorum queue registers it with the queue's
 * leader. RabbitMQ 3.10 asks the leader it last knew of; when that node has
 * just died (the queue is electing a new one), it nacks the publish and
 * every later one from that channel to that queue, for as long as the
 * channel lives. A client whose node died with the leader reconnects in a
 * tenth of a second, during the election, and would fail every call as
 * queue_full. So a nack for a routing key that the channel has never had
 * confirmed may be that, not a full queue: the request is kept, a fresh
 * channel is opened a moment later, and it is published again there. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"

#include <math.h>

#include "bind.h"
#include "codec.h"
#include "deadlines.h"
#include "json.h"
#include "link.h"
#include "log.h"
#include "metrics.h"
#include "msgpack_lua.h"
#include "task.h"
#include "trace.h"
#include "values.h"
#include "wire.h"

#define REPLY_CHANNEL 1
#define FIRST_PUBLISH_CHANNEL 2
/* A request nacked for a routing key its channel never had confirmed is
 * published again on a fresh channel at most this often. */
#define MAX_REPUBLISH 2
/* Fresh channels for that: a bucket of this many, one back every
 * SWITCH_REFILL_S, the first after SWITCH_DELAY_S and each next one after
 * twice the wait of the one before (an election on a small cluster takes
 * half a second; a queue that is really full costs a few channels and
 * delays its first queue_full errors, never more). */
#define SWITCH_TOKENS 4
#define SWITCH_REFILL_S 15.0
#define SWITCH_DELAY_S 0.25
/* A request expires in its queue a tenth of its timeout before its caller's
 * deadline, at most this much before. */
#define EXPIRY_LEAD_MAX_MS 1000
/* The broker refuses a per-message expiration of 2^32 ms or more: longer
 * timeouts are this long (49.7 days). */
#define MAX_TIMEOUT_S 4294967.0

enum {
    CALL_PENDING,
    CALL_OK,
    CALL_TIMEOUT,
    CALL_QUEUE_FULL,
    CALL_NO_ROUTE,
    CALL_CONNECTION,
    CALL_PROTOCOL,
    CALL_NOT_ACCEPTED
};

typedef struct client client;

/* What a client writes requests and reads replies in. */
typedef struct {
    const char *name;
    int (*write_request)(lua_State *L, int args, int kwargs, const rb_request_shape *shape, int array_mt,
                         rb_outbuf *b, char *err, size_t errlen);
    int (*push_reply)(lua_State *L, const char *s, size_t len, int array_mt);
} serialiser;

static const serialiser serialisers[] = {
    {"msgpack", rb_msgpack_write_request, rb_msgpack_push_reply}, /* RabiBridge's default */
    {"json", rb_json_write_request, rb_json_push_reply},
};

static const char *const outcome_kind[] = {"pending",  "ok",         "timeout",  "queue_full",
                                           "no_route", "connection", "protocol", "not_accepted"};

enum { TIMED_NOT, TIMED_OWN, TIMED_IN_ORDER };

typedef struct call {
    rb_wait wait;
    client *owner;
    uint64_t cid;
    uint64_t seq; /* publisher-confirm sequence number */
    /* its timeout: TIMED_OWN on timer, or TIMED_IN_ORDER in the client's
     * deadline queue (see arm_timeout); deadline.at_ms either way */
    int timed;
    rb_deadline deadline;
    rb_timer timer;
    double timeout;
    int clipped; /* timeout is what the caller's caller had left */
    int outcome;
    rb_buf reply; /* NUL-terminated, as the decoders want */
    const serialiser *ser;
    char message[400];
    char routing_key[256];
    int name_at; /* where the function's name starts in routing_key */
    char traceparent[RB_TRACEPARENT_LEN + 1];
    uint64_t key_hash; /* of routing_key */
    int republishes;
    struct call *next_in_bucket;
    /* made while the link was down, or nacked and kept: published on the
     * next link or the next fresh channel */
    int queued;
    /* the body, while it may be published again (kept); the buffer stays
     * with the record for the next call when not */
    rb_buf request;
    int kept;
    struct call *next_queued;
} call;

typedef struct {
    uint64_t seq, cid, key_hash;
    uint64_t end; /* where its frames end in the link's stream (rb_link_gathered_end) */
    int settled;  /* confirmed or nacked, behind one that is not yet */
} unconfirmed;

/* A channel the client publishes on, in confirm mode. The newest is the one
 * in use; older ones drain: they stay open until the broker has confirmed
 * or nacked all they carried. */
typedef struct pubchan {
    client *owner;
    amqp_channel_t number;
    uint64_t next_seq;
    unconfirmed *unconf; /* publishes awaiting their confirm, in seq order */
    size_t unconf_head, unconf_len, unconf_cap;
    /* the routing keys (hashed, never 0) the broker confirmed a publish to */
    uint64_t *acked_keys, last_acked_key;
    size_t acked_len, acked_cap;
    struct pubchan *next_draining;
} pubchan;

struct client {
    rb_sched *sched;
    rb_loop *loop;
    rb_link *link;
    int reply_ok;      /* the reply channel consumes */
    int reply_open;    /* channel 1 is open (its consumer may be gone) */
    pubchan *pub;      /* the channel publishing now, NULL when none */
    pubchan *draining; /* older ones, awaiting their confirms */
    int next_pub_number;
    /* sends the kept calls, on a fresh channel when need_fresh */
    rb_timer switch_timer;
    int need_fresh;
    double switch_tokens;
    uint64_t switch_tokens_ms;
    int closed;
    char url[1024], name[128];
    rb_tls_options tls;
    int heartbeat;
    double connect_timeout, backoff;
    int first_url; /* the node of the URL list to connect to first */
    rb_timer reconnect_timer;
    rb_link_opening *opening;     /* a connection being made off the loop */
    struct open_wait *first_open; /* the opener of the first one, waiting */
    call *queued_head;            /* calls waiting for the link to come back */
    char reply_queue[256];
    size_t reply_queue_len;
    rb_deadline_queue timed; /* the calls with the timeout of most */
    uint64_t next_cid, cid_max;
    call **buckets;
    size_t nbuckets, ncalls;
    size_t compress_threshold, max_body;
    const serialiser *ser;
    rb_buf scratch;
};

/* ---- pending calls by correlation id ---- */

static size_t bucket_of(const client *c, uint64_t cid) {
    return (size_t)(cid * 0x9E3779B97F4A7C15ull >> 17) & (c->nbuckets - 1);
}

static int calls_grow(client *c) {
    size_t n = c->nbuckets ? c->nbuckets * 2 : 64;
    call **b = calloc(n, sizeof *b);
    if (!b) return -1;
    call **old = c->buckets;
    size_t oldn = c->nbuckets;
    c->buckets = b;
    c->nbuckets = n;
    for (size_t i = 0; i < oldn; i++) {
        for (call *k = old[i], *next; k; k = next) {
            next = k->next_in_bucket;
            size_t j = bucket_of(c, k->cid);
            k->next_in_bucket = b[j];
            b[j] = k;
        }
    }
    free(old);
    return 0;
}

static int calls_add(client *c, call *k) {
    if (c->ncalls + 1 > c->nbuckets && calls_grow(c) < 0) return -1;
    size_t j = bucket_of(c, k->cid);
    k->next_in_bucket = c->buckets[j];
    c->buckets[j] = k;
    c->ncalls++;
    if (c->link) rb_link_expect_replies(c->link, c->ncalls);
    return 0;
}

static call *calls_take(client *c, uint64_t cid) {
    if (!c->nbuckets) return NULL;
    for (call **p = &c->buckets[bucket_of(c, cid)]; *p; p = &(*p)->next_in_bucket) {
        if ((*p)->cid == cid) {
            call *k = *p;
            *p = k->next_in_bucket;
            c->ncalls--;
            if (c->link) rb_link_expect_replies(c->link, c->ncalls);
            return k;
        }
    }
    return NULL;
}

/* ---- timeouts ----
 * Most calls of a client have the same timeout (the client's), so their
 * deadlines come in the order the calls are made: they wait in one
 * deadline queue, on one timer. A call with another timeout (its own
 * opts.timeout, or its caller's deadline) gets a timer of its own, unless
 * the queue is empty and takes its timeout. */

static void call_timed_out(rb_loop *loop, void *data);

static void arm_timeout(client *c, call *k) {
    uint64_t ms = rb_ms_of(k->timeout);
    if (rb_deadlines_fit(&c->timed, ms) && rb_deadlines_add(&c->timed, &k->deadline) == 0) {
        k->timed = TIMED_IN_ORDER;
        return;
    }
    k->timed = TIMED_OWN;
    k->deadline.at_ms = rb_now_ms() + ms;
    rb_timer_start(c->loop, &k->timer, k->timeout);
}

static void disarm_timeout(call *k) {
    client *c = k->owner;
    if (k->timed == TIMED_OWN)
        rb_timer_stop(c->loop, &k->timer);
    else if (k->timed == TIMED_IN_ORDER)
        rb_deadlines_remove(&c->timed, &k->deadline);
    k->timed = TIMED_NOT;
}

static void call_deadline_passed(rb_deadline *d, void *data) {
    client *c = data;
    call *k = rb_deadline_owner(d, call, deadline);
    k->timed = TIMED_NOT;
    call_timed_out(c->loop, k);
}

static void call_finish(call *k, int outcome) {
    k->outcome = outcome;
    disarm_timeout(k);
    rb_wait_wake(&k->wait);
}

static void fail_all(client *c, int outcome, const char *why) {
    for (size_t i = 0; i < c->nbuckets; i++) {
        call *k;
        while ((k = c->buckets[i]) != NULL) {
            c->buckets[i] = k->next_in_bucket;
            c->ncalls--;
            snprintf(k->message, sizeof k->message, "%s", why);
            call_finish(k, outcome);
        }
    }
    if (c->link) rb_link_expect_replies(c->link, 0);
}

static void fail_queued(client *c, const char *why) {
    call *k;
    while ((k = c->queued_head) != NULL) {
        c->queued_head = k->next_queued;
        k->queued = 0;
        snprintf(k->message, sizeof k->message, "%s", why);
        call_finish(k, CALL_CONNECTION);
    }
}

static void enqueue(client *c, call *k) {
    k->queued = 1;
    k->next_queued = NULL;
    call **tail = &c->queued_head;
    while (*tail) tail = &(*tail)->next_queued;
    *tail = k;
}

static void unqueue(client *c, call *k) {
    for (call **p = &c->queued_head; *p; p = &(*p)->next_queued) {
        if (*p == k) {
            *p = k->next_queued;
            k->queued = 0;
            return;
        }
    }
}

/* ---- publishing channels ---- */

static uint64_t key_hash_of(const char *key, size_t len) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (size_t i = 0; i < len; i++) h = (h ^ (unsigned char)key[i]) * 0x100000001b3ull;
    return h | 1; /* 0 marks a free slot of acked_keys */
}

static int acked_has(const pubchan *pc, uint64_t key) {
    if (key == pc->last_acked_key) return 1;
    if (!pc->acked_cap) return 0;
    for (size_t i = key & (pc->acked_cap - 1); pc->acked_keys[i]; i = (i + 1) & (pc->acked_cap - 1))
        if (pc->acked_keys[i] == key) return 1;
    return 0;
}

static void acked_put(uint64_t *slots, size_t cap, uint64_t key) {
    size_t i = key & (cap - 1);
    while (slots[i] && slots[i] != key) i = (i + 1) & (cap - 1);
    slots[i] = key;
}

/* Notes that the broker confirmed a publish to key. Out of memory only
 * means a later nack for it may be taken for an election. */
static void acked_add(pubchan *pc, uint64_t key) {
    if (acked_has(pc, key)) {
        pc->last_acked_key = key;
        return;
    }
    if (2 * (pc->acked_len + 1) > pc->acked_cap) {
        size_t cap = pc->acked_cap ? pc->acked_cap * 2 : 16;
        uint64_t *grown = calloc(cap, sizeof *grown);
        if (!grown) return;
        for (size_t i = 0; i < pc->acked_cap; i++)
            if (pc->acked_keys[i]) acked_put(grown, cap, pc->acked_keys[i]);
        free(pc->acked_keys);
        pc->acked_keys = grown;
        pc->acked_cap = cap;
    }
    acked_put(pc->acked_keys, pc->acked_cap, key);
    pc->acked_len++;
    pc->last_acked_key = key;
}

static unconfirmed *unconfirmed_at(const pubchan *pc, size_t i) {
    return &pc->unconf[(pc->unconf_head + i) % pc->unconf_cap];
}

static int remember_unconfirmed(pubchan *pc, uint64_t seq, uint64_t cid, uint64_t key, uint64_t end) {
    if (pc->unconf_len == pc->unconf_cap) {
        size_t cap = pc->unconf_cap ? pc->unconf_cap * 2 : 256;
        unconfirmed *grown = malloc(cap * sizeof *grown);
        if (!grown) return -1;
        for (size_t i = 0; i < pc->unconf_len; i++) grown[i] = *unconfirmed_at(pc, i);
        free(pc->unconf);
        pc->unconf = grown;
        pc->unconf_cap = cap;
        pc->unconf_head = 0;
    }
    pc->unconf_len++;
    *unconfirmed_at(pc, pc->unconf_len - 1) = (unconfirmed){seq, cid, key, end, 0};
    return 0;
}

/* The entry of publish seq (the ring is in seq order), or NULL. */
static unconfirmed *unconfirmed_find(const pubchan *pc, uint64_t seq) {
    size_t lo = 0, hi = pc->unconf_len;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (unconfirmed_at(pc, mid)->seq < seq)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < pc->unconf_len && unconfirmed_at(pc, lo)->seq == seq ? unconfirmed_at(pc, lo) : NULL;
}

static void pubchan_free(pubchan *pc) {
    free(pc->unconf);
    free(pc->acked_keys);
    free(pc);
}

static void pubchan_unlink(client *c, pubchan *pc) {
    if (c->pub == pc) {
        c->pub = NULL;
        return;
    }
    for (pubchan **p = &c->draining; *p; p = &(*p)->next_draining) {
        if (*p == pc) {
            *p = pc->next_draining;
            return;
        }
    }
}

/* Takes pc off the client's books and frees it. Its channel is closed
 * without waiting (its number is not used again before the broker's
 * close-ok, see next_channel_number), unless the broker closed it. */
static void pubchan_retire(client *c, pubchan *pc, int send_close) {
    pubchan_unlink(c, pc);
    if (send_close)
        rb_link_channel_close(c->link, pc->number);
    else
        rb_link_channel_forget(c->link, pc->number);
    pubchan_free(pc);
}

static void enqueue(client *c, call *k);

/* The channel or the connection is gone: the calls whose publish the broker
 * had not confirmed yet fail as not accepted, since it never took charge of
 * them (on a cluster a confirm means the queue's replicas have it); a
 * caller may send them again. The confirmed ones wait for their replies.
 * A request the link never wrote whole (gathered for the end of the loop's
 * step when the connection died) never reached the broker: it waits for
 * the next link instead, as a call made while the link was down does. */
static void fail_unconfirmed(client *c, pubchan *pc, const char *why) {
    int lost = c->link && !rb_link_is_open(c->link);
    for (size_t i = 0; i < pc->unconf_len; i++) {
        unconfirmed *u = unconfirmed_at(pc, i);
        call *k = u->settled ? NULL : calls_take(c, u->cid);
        if (!k) continue;
        if (lost && k->kept && u->end > rb_link_written(c->link)) {
            enqueue(c, k);
            continue;
        }
        snprintf(k->message, sizeof k->message,
                 "%s before the broker confirmed the request to '%s': it was not accepted (it may have "
                 "reached the queue, but the broker took no charge of it)",
                 why, k->routing_key);
        call_finish(k, CALL_NOT_ACCEPTED);
    }
    pc->unconf_len = 0;
}

/* Every publishing channel: its unconfirmed calls failed, and it freed
 * (closed too when the link lives on). */
static void pubchans_drop(client *c, const char *why) {
    rb_timer_stop(c->loop, &c->switch_timer);
    c->need_fresh = 0;
    int open = rb_link_is_open(c->link);
    while (c->pub || c->draining) {
        pubchan *pc = c->pub ? c->pub : c->draining;
        fail_unconfirmed(c, pc, why);
        pubchan_retire(c, pc, open);
    }
}

/* Kept calls on a live link with no timer to send them: soon, on the
 * channels setup_channels makes again. */
static void retry_soon(client *c) {
    if (c->queued_head && rb_link_is_open(c->link) && c->switch_timer.heap_index < 0)
        rb_timer_start(c->loop, &c->switch_timer, SWITCH_DELAY_S);
}

static double seconds_until(uint64_t deadline_ms) {
    int64_t left = (int64_t)(deadline_ms - rb_now_ms());
    return left > 0 ? (double)left / 1000.0 : 0;
}

/* The wait before a fresh channel may be opened, the bucket refilled for
 * the time gone by; -1 when it is empty. take_switch takes one. */
static double switch_wait(client *c) {
    uint64_t now = rb_now_ms();
    c->switch_tokens += (double)(now - c->switch_tokens_ms) / 1000.0 / SWITCH_REFILL_S;
    if (c->switch_tokens > SWITCH_TOKENS) c->switch_tokens = SWITCH_TOKENS;
    c->switch_tokens_ms = now;
    if (c->switch_tokens < 1) return -1;
    return SWITCH_DELAY_S * (double)(1 << (SWITCH_TOKENS - (int)c->switch_tokens));
}

/* A nacked request whose routing key its channel never had confirmed is
 * kept for a fresh channel (see the top of this file), if it may be sent
 * again and has the time to wait for one. A late nack from a channel
 * already replaced needs no fresh one: the current channel may do. 1 if
 * kept. */
static int keep_nacked(client *c, pubchan *pc, call *k) {
    if (!k->kept || k->republishes >= MAX_REPUBLISH || acked_has(pc, k->key_hash) ||
        !rb_link_is_open(c->link))
        return 0;
    int fresh = pc == c->pub || !c->pub;
    int armed = c->switch_timer.heap_index >= 0;
    double wait;
    if (armed && (c->need_fresh || !fresh))
        wait = seconds_until(c->switch_timer.deadline_ms);
    else
        wait = fresh ? switch_wait(c) : 0;
    if (wait < 0 || (k->timed && seconds_until(k->deadline.at_ms) < wait + 0.1)) return 0;
    if (fresh && !c->need_fresh) {
        c->switch_tokens -= 1;
        c->need_fresh = 1;
        rb_timer_stop(c->loop, &c->switch_timer);
        rb_timer_start(c->loop, &c->switch_timer, wait);
    } else if (!armed) {
        rb_timer_start(c->loop, &c->switch_timer, wait);
    }
    k->republishes++;
    enqueue(c, k);
    return 1;
}

static void on_nacked(client *c, pubchan *pc, uint64_t cid) {
    call *k = calls_take(c, cid);
    if (!k || keep_nacked(c, pc, k)) return;
    snprintf(k->message, sizeof k->message,
             "the queue behind '%.200s' is full (the broker refused the request)%s", k->routing_key,
             k->republishes ? ", or is a quorum queue that was electing its leader each time" : "");
    call_finish(k, CALL_QUEUE_FULL);
}

/* ---- link callbacks ---- */

/* The reply body in k->reply, NUL-terminated as the decoders want:
 * decompressed straight into it, or copied there, since the link reuses its
 * own buffer before the caller resumes. -> 0, or -1 with k failed. */
static int keep_reply(client *c, call *k, const rb_message *m) {
    const void *body;
    size_t len;
    if (rb_body_unwrap("reply", m->body, m->body_len, c->max_body, &k->reply, &body, &len, k->message,
                       sizeof k->message) < 0) {
        call_finish(k, CALL_PROTOCOL);
        return -1;
    }
    int decompressed = body == k->reply.data; /* the reserve below may move it, body along */
    if (rb_buf_reserve(&k->reply, len + 1) < 0) {
        snprintf(k->message, sizeof k->message, "out of memory for the reply");
        call_finish(k, CALL_PROTOCOL);
        return -1;
    }
    if (!decompressed) memcpy(k->reply.data, body, len);
    k->reply.data[len] = '\0';
    k->reply.len = len;
    return 0;
}

static void on_reply(rb_link *link, void *data, const rb_message *m) {
    (void)link;
    client *c = data;
    char *end;
    errno = 0;
    uint64_t cid = strtoull(m->correlation_id, &end, 10);
    call *k = (*m->correlation_id && !*end && !errno) ? calls_take(c, cid) : NULL;
    if (!k) {
        rb_log(RB_LOG_DEBUG, "dropped a reply nobody waits for (correlation id '%s')", m->correlation_id);
        return;
    }
    if (*m->timeout_text) {
        /* The request was never run: a host answered it for its queue or
         * its deadline. The body says so for Python clients. */
        snprintf(k->message, sizeof k->message, "%s", m->timeout_text);
        call_finish(k, CALL_TIMEOUT);
        return;
    }
    if (keep_reply(c, k, m) == 0) call_finish(k, CALL_OK);
}

static void on_return(rb_link *link, void *data, const rb_message *m) {
    (void)link;
    pubchan *pc = data;
    call *k = calls_take(pc->owner, strtoull(m->correlation_id, NULL, 10));
    if (!k) return;
    snprintf(k->message, sizeof k->message, "no function is served at routing key '%s' (%s)", k->routing_key,
             m->reply_text);
    call_finish(k, CALL_NO_ROUTE);
}

static void settle(client *c, pubchan *pc, unconfirmed *u, int nack) {
    u->settled = 1;
    if (nack)
        on_nacked(c, pc, u->cid);
    else
        acked_add(pc, u->key_hash);
}

/* The broker confirms in any order: a single ack or nack settles its own
 * publish, a multiple one every publish up to tag. */
static void on_confirm(rb_link *link, void *data, uint64_t tag, int multiple, int nack) {
    (void)link;
    pubchan *pc = data;
    client *c = pc->owner;
    if (multiple) {
        for (size_t i = 0; i < pc->unconf_len && unconfirmed_at(pc, i)->seq <= tag; i++)
            if (!unconfirmed_at(pc, i)->settled) settle(c, pc, unconfirmed_at(pc, i), nack);
    } else {
        unconfirmed *u = unconfirmed_find(pc, tag);
        if (u && !u->settled) settle(c, pc, u, nack);
    }
    while (pc->unconf_len && unconfirmed_at(pc, 0)->settled) {
        pc->unconf_head = (pc->unconf_head + 1) % pc->unconf_cap;
        pc->unconf_len--;
    }
    if (pc != c->pub && !pc->unconf_len) pubchan_retire(c, pc, 1);
}

static void on_publish_channel_closed(rb_link *link, void *data, const char *why, int channel_open) {
    (void)link;
    (void)channel_open;
    pubchan *pc = data;
    client *c = pc->owner;
    char msg[320];
    snprintf(msg, sizeof msg, "the broker closed the publishing channel: %s", why);
    fail_unconfirmed(c, pc, msg);
    pubchan_retire(c, pc, 0); /* the next call, or retry_soon, opens a new one */
    retry_soon(c);
}

static void on_reply_channel_closed(rb_link *link, void *data, const char *why, int channel_open) {
    (void)link;
    client *c = data;
    char msg[320];
    snprintf(msg, sizeof msg, "the broker closed the reply %s: %s", channel_open ? "consumer" : "channel",
             why);
    c->reply_ok = 0;
    c->reply_open = channel_open; /* a cancelled consumer leaves its channel open */
    /* Their replies would go to a queue that is no longer consumed. */
    pubchans_drop(c, msg);
    fail_all(c, CALL_CONNECTION, msg);
    retry_soon(c);
}

static void on_lost(rb_link *link, void *data, const char *why) {
    client *c = data;
    char msg[320];
    snprintf(msg, sizeof msg, "connection to the broker lost: %s", why);
    c->reply_ok = 0;
    /* Back through another node: this one may be down. */
    c->first_url = rb_link_url_index(link) + 1;
    /* Calls in flight fail now rather than at their timeout: their replies
     * would go to a reply queue that died with the connection. Kept calls
     * wait for the next link. */
    pubchans_drop(c, "connection to the broker lost");
    fail_all(c, CALL_CONNECTION, msg);
    c->backoff = 0.1;
    rb_timer_start(c->loop, &c->reconnect_timer, c->backoff);
}

static const rb_channel_handler reply_handler = {on_reply, NULL, NULL, on_reply_channel_closed};
static const rb_channel_handler publish_handler = {NULL, on_return, on_confirm, on_publish_channel_closed};

/* ---- set-up ----
 * These touch the link alone: an opening runs them on its own thread,
 * before the link has a loop; channel_ready then makes the client use what
 * they opened. */

/* The reply queue on the reply channel, consumed; its name to out. */
static int declare_reply_queue(rb_link *link, char *out, size_t outlen, char *err, size_t errlen) {
    return rb_link_consume_private_queue(link, REPLY_CHANNEL, "reply queue", out, outlen, err, errlen);
}

static int open_confirm_channel(rb_link *link, amqp_channel_t number, void *data, char *err, size_t errlen) {
    if (rb_link_channel_open(link, number, &publish_handler, data, err, errlen) < 0 ||
        rb_link_declare_rpc_exchange(link, number, err, errlen) < 0)
        return -1;
    amqp_confirm_select(rb_link_conn(link), number);
    return rb_link_check_reply(link, number, "confirm.select", err, errlen);
}

static int open_reply_channel(rb_link *link, char *out, size_t outlen, char *err, size_t errlen) {
    if (rb_link_channel_open(link, REPLY_CHANNEL, &reply_handler, NULL, err, errlen) < 0) return -1;
    return declare_reply_queue(link, out, outlen, err, errlen);
}

/* What a new link needs before it carries calls (an opening's setup). */
static int link_setup(rb_link *link, char *out, size_t outlen, char *err, size_t errlen) {
    if (open_reply_channel(link, out, outlen, err, errlen) < 0) return -1;
    return open_confirm_channel(link, FIRST_PUBLISH_CHANNEL, NULL, err, errlen);
}

static pubchan *pubchan_new(client *c, amqp_channel_t number) {
    pubchan *pc = calloc(1, sizeof *pc);
    if (!pc) return NULL;
    pc->owner = c;
    pc->number = number;
    pc->next_seq = 1;
    return pc;
}

static int channel_in_use(const client *c, int n) {
    if (c->pub && c->pub->number == n) return 1;
    for (const pubchan *pc = c->draining; pc; pc = pc->next_draining)
        if (pc->number == n) return 1;
    return 0;
}

/* A channel number no publishing channel of this link uses, counting up
 * from the last (so that one closed a moment ago, whose close-ok may still
 * be on its way, is not opened again); 0 when every one is in use. */
static amqp_channel_t next_channel_number(client *c) {
    int max = rb_link_channel_max(c->link);
    for (int tries = FIRST_PUBLISH_CHANNEL; tries <= max; tries++) {
        int n = c->next_pub_number > max ? FIRST_PUBLISH_CHANNEL : c->next_pub_number;
        c->next_pub_number = n + 1;
        if (!channel_in_use(c, n)) return (amqp_channel_t)n;
    }
    return 0;
}

/* A new publishing channel on the live link, used from now on; the one it
 * replaces is closed once its confirms are in. The broker answered a moment
 * ago, so these round trips stay on the loop. */
static int open_publish_channel(client *c, char *err, size_t errlen) {
    amqp_channel_t number = next_channel_number(c);
    pubchan *pc = number ? pubchan_new(c, number) : NULL;
    if (!pc) {
        snprintf(err, errlen, number ? "out of memory" : "no channel number free for publishing");
        return -1;
    }
    if (open_confirm_channel(c->link, number, pc, err, errlen) < 0) {
        rb_link_channel_forget(c->link, number); /* it must not report to pc */
        pubchan_free(pc);
        return -1;
    }
    pubchan *previous = c->pub;
    c->pub = pc;
    if (previous && previous->unconf_len) {
        previous->next_draining = c->draining;
        c->draining = previous;
    } else if (previous) {
        pubchan_retire(c, previous, 1);
    }
    if (!c->pub) { /* the close of the previous one found the link dead */
        snprintf(err, errlen, "connection to the broker lost");
        return -1;
    }
    return 0;
}

/* Channel 1 consumes reply_queue: replies come in. */
static void reply_ready(client *c, const char *reply_queue) {
    rb_link_channel_bind(c->link, REPLY_CHANNEL, &reply_handler, c);
    int n = snprintf(c->reply_queue, sizeof c->reply_queue, "%s", reply_queue);
    c->reply_queue_len = n < 0                               ? 0
                         : (size_t)n < sizeof c->reply_queue ? (size_t)n
                                                             : sizeof c->reply_queue - 1;
    c->reply_ok = c->reply_open = 1;
}

static void channel_ready(client *c, const char *reply_queue) {
    reply_ready(c, reply_queue);
    c->next_pub_number = FIRST_PUBLISH_CHANNEL + 1;
    c->pub = pubchan_new(c, FIRST_PUBLISH_CHANNEL);
    if (c->pub)
        rb_link_channel_bind(c->link, FIRST_PUBLISH_CHANNEL, &publish_handler, c->pub);
    else
        rb_link_channel_close(c->link, FIRST_PUBLISH_CHANNEL); /* the next call opens another */
}

/* The channels again on a live link, after the broker closed one. */
static int setup_channels(client *c, char *err, size_t errlen) {
    if (!c->reply_ok) {
        char reply_queue[256];
        /* Opening channel 1 again while it is open would cost the connection. */
        int rc = c->reply_open ? declare_reply_queue(c->link, reply_queue, sizeof reply_queue, err, errlen)
                               : open_reply_channel(c->link, reply_queue, sizeof reply_queue, err, errlen);
        if (rc < 0) return -1;
        reply_ready(c, reply_queue);
    }
    return c->pub ? 0 : open_publish_channel(c, err, errlen);
}

static void link_options(client *c, rb_link_options *opts) {
    *opts =
        (rb_link_options){c->loop, c->url, c->heartbeat, c->connect_timeout, c->name, &c->tls, c->first_url};
}

/* A link made by an opening becomes the client's. */
static void adopt_link(client *c, rb_link *link, const char *reply_queue) {
    c->link = link;
    channel_ready(c, reply_queue);
    rb_link_on_lost(link, on_lost, c);
    rb_link_set_max_body(link, c->max_body);
    rb_link_expect_replies(link, c->ncalls);
}

static int publish_call(client *c, call *k, const void *body, size_t len);

/* Publishes the calls made while there was no link, and those kept for a
 * fresh channel, in order. */
static void publish_queued(client *c) {
    call *k;
    while ((k = c->queued_head) != NULL && rb_link_is_open(c->link) && c->pub) {
        c->queued_head = k->next_queued;
        k->queued = 0;
        if (publish_call(c, k, k->request.data, k->request.len) < 0 && !k->wait.woken) {
            k->queued = 1; /* lost again already: wait for the next link */
            k->next_queued = c->queued_head;
            c->queued_head = k;
            break;
        }
    }
}

/* The switch timer: the kept calls go out, on a fresh channel when the
 * current one nacked them. */
static void on_switch_tick(rb_loop *loop, void *data) {
    (void)loop;
    client *c = data;
    if (c->closed || !rb_link_is_open(c->link)) return; /* the next link brings one */
    int fresh = c->need_fresh && c->pub;
    c->need_fresh = 0;
    char err[600] = "connection to the broker lost";
    if (setup_channels(c, err, sizeof err) < 0 || (fresh && open_publish_channel(c, err, sizeof err) < 0) ||
        !rb_link_is_open(c->link)) {
        char msg[400];
        snprintf(msg, sizeof msg, "the broker refused a request, and no new channel to send it again: %.300s",
                 err);
        if (rb_link_is_open(c->link)) fail_queued(c, msg);
        return;
    }
    if (fresh)
        rb_log(RB_LOG_WARN,
               "client: the broker refused requests to a routing key this channel has had no publish "
               "confirmed to yet (a quorum queue electing its leader, or a full queue); sending them again "
               "on channel %d",
               (int)c->pub->number);
    publish_queued(c);
}

static void reconnect_later(client *c, const char *err) {
    c->backoff = c->backoff * 2 > 5 ? 5 : c->backoff * 2;
    rb_log(RB_LOG_WARN, "client: reconnection failed (%s); next try in %.1f s", err, c->backoff);
    rb_timer_start(c->loop, &c->reconnect_timer, c->backoff);
}

static void on_reconnected(void *data, rb_link *link, const char *reply_queue, const char *err) {
    client *c = data;
    c->opening = NULL;
    if (!link) {
        reconnect_later(c, err);
        return;
    }
    adopt_link(c, link, reply_queue);
    rb_log(RB_LOG_INFO, "client: reconnected to the broker");
    publish_queued(c);
}

/* The connection is made off the loop (rb_link_open_start): a broker that
 * hangs in the handshake holds up only the calls queued for it, which wait
 * within their own timeouts. */
static void on_reconnect_tick(rb_loop *loop, void *data) {
    (void)loop;
    client *c = data;
    if (c->closed || c->opening) return;
    rb_link_close(c->link);
    c->link = NULL;
    char err[600];
    rb_link_options opts;
    link_options(c, &opts);
    c->opening = rb_link_open_start(&opts, link_setup, on_reconnected, c, err, sizeof err);
    if (!c->opening) reconnect_later(c, err);
}

static const serialiser *serialiser_named(const char *name) {
    for (size_t i = 0; i < sizeof serialisers / sizeof *serialisers; i++)
        if (strcmp(serialisers[i].name, name) == 0) return &serialisers[i];
    return NULL;
}

static client **check_client(lua_State *L) {
    return luaL_checkudata(L, 1, RB_CLIENT_CLASS);
}

/* The client at argument 1 if its link is up, else NULL. */
static client *open_client(lua_State *L) {
    client **cp = check_client(L);
    return *cp && rb_link_is_open((*cp)->link) ? *cp : NULL;
}

/* ---- the first connection ---- */

/* core.client_open waits for its connection as any wait does: its task
 * yields (or the main thread drives the loop), so a broker that hangs
 * holds up only this caller. Until the wait pushes it, the client is the
 * wait's; a cancelled wait frees it, and with it the opening. */
typedef struct open_wait {
    rb_wait wait;
    client *c; /* NULL once the caller has it */
    int ok;
    char err[600];
} open_wait;

static void client_free(client *c);

static void on_first_open(void *data, rb_link *link, const char *reply_queue, const char *err) {
    client *c = data;
    open_wait *ow = c->first_open;
    c->opening = NULL;
    c->first_open = NULL;
    if (link) {
        adopt_link(c, link, reply_queue);
        ow->ok = 1;
    } else {
        snprintf(ow->err, sizeof ow->err, "%s", err);
    }
    rb_wait_wake(&ow->wait);
}

static int open_push(rb_wait *w, lua_State *L) {
    open_wait *ow = (open_wait *)w;
    if (!ow->ok) {
        lua_pushnil(L);
        rb_new_error(L, "connection", ow->err);
        return 2;
    }
    client **cp = lua_newuserdata(L, sizeof *cp);
    *cp = ow->c;
    ow->c = NULL;
    luaL_getmetatable(L, RB_CLIENT_CLASS);
    lua_setmetatable(L, -2);
    return 1;
}

/* Cancelled: the opening is given up now, so that a link it makes later
 * is never handed to a client about to be freed. */
static void open_detach(rb_wait *w) {
    open_wait *ow = (open_wait *)w;
    if (!ow->c) return;
    rb_link_open_abandon(ow->c->opening);
    ow->c->opening = NULL;
    ow->c->first_open = NULL;
}

static void open_release(rb_wait *w) {
    open_wait *ow = (open_wait *)w;
    if (ow->c) {
        ow->c->first_open = NULL;
        client_free(ow->c);
    }
    free(ow);
}

static const rb_wait_ops open_ops = {open_push, open_detach, open_release, NULL};

/* core.client_open(url, { heartbeat=, connect_timeout=, cid_max=, compress_threshold=, max_body=,
 *                         name=, tls=, serialiser= }) -> client | nil, error */
int rb_api_client_open(lua_State *L) {
    static const char fname[] = "client";
    rb_sched *s = rb_sched_of(L);
    size_t urllen;
    const char *url = luaL_checklstring(L, 1, &urllen);
    luaL_argcheck(L, urllen < 1024, 1, "URL longer than 1023 bytes");
    rb_check_options(L, 2, fname);
    const char *name = rb_opt_string(L, 2, fname, "name", "rabibridge client");
    rb_tls_options tls;
    rb_opt_tls(L, 2, fname, &tls);
    int heartbeat = rb_opt_int(L, 2, fname, "heartbeat", 0, 65535, 60);
    double connect_timeout = rb_opt_number(L, 2, fname, "connect_timeout", 10);
    /* A random node of a cluster first, so that clients spread over it. */
    int nurls = rb_link_url_count(url);
    int first = nurls > 1 ? (int)(rb_random64() % (uint64_t)nurls) : 0;
    double cid_max = rb_opt_number(L, 2, fname, "cid_max", 1073741824.0);
    if (!(cid_max >= 1 && cid_max <= 9007199254740992.0))
        rb_opt_error(L, fname, "cid_max", "out of range (1 to 2^53)");
    size_t threshold, max_body;
    rb_opt_body_limits(L, 2, fname, &threshold, &max_body);
    const serialiser *ser = serialiser_named(rb_opt_string(L, 2, fname, "serialiser", serialisers[0].name));
    if (!ser) rb_opt_error(L, fname, "serialiser", "expected 'json' or 'msgpack'");
    client *c = calloc(1, sizeof *c);
    open_wait *ow = calloc(1, sizeof *ow);
    if (!c || !ow) {
        free(c);
        free(ow);
        return luaL_error(L, "client: out of memory");
    }
    c->sched = s;
    c->loop = rb_sched_loop(s);
    c->cid_max = (uint64_t)cid_max;
    snprintf(c->url, sizeof c->url, "%s", url);
    snprintf(c->name, sizeof c->name, "%s", name);
    c->tls = tls;
    c->heartbeat = heartbeat;
    c->connect_timeout = connect_timeout;
    c->first_url = first;
    rb_timer_init(&c->reconnect_timer, on_reconnect_tick, c);
    rb_timer_init(&c->switch_timer, on_switch_tick, c);
    rb_deadlines_init(&c->timed, c->loop, call_deadline_passed, c);
    c->switch_tokens = SWITCH_TOKENS;
    c->switch_tokens_ms = rb_now_ms();
    c->compress_threshold = threshold;
    c->max_body = max_body;
    c->ser = ser;
    /* A random start makes two clients sharing a reply path unlikely to
     * collide, as RabiBridge does. */
    c->next_cid = rb_random64() % c->cid_max;
    rb_wait_init(&ow->wait, s, &open_ops);
    ow->c = c;
    c->first_open = ow;
    rb_link_options opts;
    link_options(c, &opts);
    c->opening = rb_link_open_start(&opts, link_setup, on_first_open, c, ow->err, sizeof ow->err);
    if (!c->opening) {
        c->first_open = NULL;
        rb_wait_wake(&ow->wait); /* settled at once, with ow->err */
    }
    return rb_wait_for(L, &ow->wait);
}

/* ---- what a call returns ---- */

/* false, 1 and an error value of kind (naming the function and the trace
 * when given); counts the outcome. */
static int push_failure(lua_State *L, const char *kind, const char *message, const char *name,
                        const char *traceparent) {
    lua_pushboolean(L, 0);
    lua_pushinteger(L, 1);
    rb_new_error(L, kind, message);
    if (name) {
        lua_pushstring(L, name);
        lua_setfield(L, -2, "func");
    }
    if (traceparent) {
        lua_pushlstring(L, traceparent + 3, 32); /* its trace id */
        lua_setfield(L, -2, "trace_id");
    }
    rb_metrics_client_call(kind);
    return 3;
}

typedef struct {
    call *k;
    lua_State *waiter;
    int nresults;
} reply_job;

/* Run on the scheduler's builder thread (lua_cpcall): decodes the reply of
 * job->k there and moves true, 0 and the result, or true, 1, the remote
 * error and the traceparent, to the waiter. Anything a decode can raise
 * (out of memory, a reply nested past the stack) is caught by the cpcall
 * instead of escaping into the loop. -> nresults 0: not a plain reply. */
static int decode_reply(lua_State *B) {
    reply_job *job = lua_touserdata(B, 1);
    lua_settop(B, 0);
    call *k = job->k;
    lua_pushboolean(B, 1);
    int array_mt = rb_push_array_mt(B);
    if (k->ser->push_reply(B, k->reply.data ? k->reply.data : "", k->reply.len, array_mt) < 0) return 0;
    lua_remove(B, array_mt);
    const char *kind = "ok";
    if (lua_tonumber(B, 2) != 0) {
        lua_pushlstring(B, k->traceparent, RB_TRACEPARENT_LEN);
        kind = "remote_error";
    } else if (lua_type(B, 3) == LUA_TLIGHTUSERDATA && !lua_touserdata(B, 3)) {
        /* A top-level null is a function that returned nothing: nil.
         * Nested nulls stay rabi.null, since nil cannot live in a table. */
        lua_pushnil(B);
        lua_replace(B, 3);
    }
    job->nresults = lua_gettop(B);
    /* A handful of values: within the slots the waiter's C frame had. */
    lua_xmove(B, job->waiter, job->nresults);
    rb_metrics_client_call(kind);
    return 0;
}

/* The reply's values, decoded (decode_reply); or, for a reply of any other
 * shape or one the decode failed on, nil, the body and the traceparent,
 * which the Lua layer decodes, judges (in the task, where an error is an
 * error of its own) and counts. */
static int push_reply(call *k, lua_State *L) {
    lua_State *B = rb_sched_builder(k->wait.sched);
    reply_job job = {k, L, 0};
    if (lua_cpcall(B, decode_reply, &job) == 0 && job.nresults) return job.nresults;
    lua_settop(B, 0);
    lua_pushnil(L);
    lua_pushlstring(L, k->reply.data ? k->reply.data : "", k->reply.len);
    lua_pushlstring(L, k->traceparent, RB_TRACEPARENT_LEN);
    return 3;
}

static const char *call_name(const call *k) {
    return k->routing_key + k->name_at;
}

static int call_push(rb_wait *w, lua_State *L) {
    call *k = (call *)w;
    if (k->outcome == CALL_OK) return push_reply(k, L);
    return push_failure(L, outcome_kind[k->outcome], k->message, call_name(k), k->traceparent);
}

static int call_push_cancelled(rb_wait *w, lua_State *L, const char *why) {
    call *k = (call *)w;
    return push_failure(L, "cancelled", why, call_name(k), k->traceparent);
}

/* Cancelled: the call leaves the client's books, so that a reply, a nack
 * or a return that comes later finds nobody. */
static void call_detach(rb_wait *w) {
    call *k = (call *)w;
    disarm_timeout(k);
    if (k->queued)
        unqueue(k->owner, k);
    else
        calls_take(k->owner, k->cid);
}

/* Call records done with, for the next calls: one is needed per call. Not
 * the client's (a call may be released after its client is freed), and
 * cleared whole when taken, as calloc would give it. */
#define SPARE_CALLS 64
static call *spare_calls[SPARE_CALLS];
static int nspare_calls;

/* A request buffer up to this size stays with its record for the next. */
#define KEEP_REQUEST_BUFFER 4096

static call *call_new(void) {
    if (nspare_calls == 0) return calloc(1, sizeof(call));
    call *k = spare_calls[--nspare_calls];
    rb_buf request = k->request;
    memset(k, 0, sizeof *k);
    k->request.data = request.data;
    k->request.cap = request.cap;
    return k;
}

static void call_release(rb_wait *w) {
    call *k = (call *)w;
    rb_buf_free(&k->reply);
    if (nspare_calls < SPARE_CALLS && k->request.cap <= KEEP_REQUEST_BUFFER) {
        spare_calls[nspare_calls++] = k;
        return;
    }
    rb_buf_free(&k->request);
    free(k);
}

static const rb_wait_ops call_ops = {call_push, call_detach, call_release, call_push_cancelled};

static void call_timed_out(rb_loop *loop, void *data) {
    (void)loop;
    call *k = data;
    if (k->queued) {
        unqueue(k->owner, k);
        if (k->republishes)
            snprintf(k->message, sizeof k->message,
                     "the broker refused the request to '%s', and it could not be sent again within %g s",
                     k->routing_key, k->timeout);
        else
            snprintf(k->message, sizeof k->message, "no connection to the broker within %g s", k->timeout);
    } else if (calls_take(k->owner, k->cid)) {
        snprintf(k->message, sizeof k->message, "no reply from '%s' within %g s%s", k->routing_key,
                 k->timeout, k->clipped ? " (the time left before its own caller's deadline)" : "");
    } else {
        return;
    }
    call_finish(k, CALL_TIMEOUT);
}

/* A copy of the request's body in k->request (unless it is that already),
 * kept while it may be published again. */
static int keep_body(call *k, const void *body, size_t len) {
    if (k->kept && body == k->request.data) return 0;
    if (rb_buf_reserve(&k->request, len + 1) < 0) return -1;
    memcpy(k->request.data, body, len);
    k->request.len = len;
    k->kept = 1;
    return 0;
}

/* Keeps the body of a request that the link has not written yet (it may
 * have to wait for the next link, see fail_unconfirmed), or that the
 * broker may nack for an election (its routing key not confirmed on this
 * channel yet); lets go of it otherwise. */
static int keep_request(const pubchan *pc, call *k, const void *body, size_t len, int unwritten) {
    if (!unwritten && (k->republishes >= MAX_REPUBLISH || acked_has(pc, k->key_hash))) {
        k->kept = 0;
        return 0;
    }
    return keep_body(k, body, len);
}

/* Publishes k (already carrying its cid and routing key). 0, or -1 when the
 * link failed under us before the request went out (k is left to the
 * caller) or k could not be tracked (k is failed). */
static int publish_call(client *c, call *k, const void *body, size_t len) {
    /* rb_format_uint64, not snprintf: twice per call, and snprintf costs
     * more than the rest of the properties together. */
    char cid[24];
    amqp_basic_properties_t props;
    props._flags = AMQP_BASIC_CORRELATION_ID_FLAG | AMQP_BASIC_REPLY_TO_FLAG;
    props.correlation_id = (amqp_bytes_t){rb_format_uint64(cid, k->cid), cid};
    props.reply_to = (amqp_bytes_t){c->reply_queue_len, c->reply_queue};
    /* With a timeout, the request expires in its queue a little before its
     * caller gives up (expiration), early enough that the host which takes
     * expired requests (server.c's answer_timeouts) can still answer it
     * with a timeout error; a server that takes it late answers so too
     * (header). */
    char expiration[24];
    amqp_table_entry_t headers[2];
    int nheaders = 0;
    if (k->timeout > 0) {
        uint64_t ms = rb_ms_of(k->timeout);
        /* Published again (after a nack, or a reconnection): what is left. */
        if (k->timed) ms = (uint64_t)(seconds_until(k->deadline.at_ms) * 1000.0) + 1;
        uint64_t early = ms / 10 < EXPIRY_LEAD_MAX_MS ? ms / 10 : EXPIRY_LEAD_MAX_MS;
        props._flags |= AMQP_BASIC_EXPIRATION_FLAG;
        props.expiration =
            (amqp_bytes_t){rb_format_uint64(expiration, ms - early ? ms - early : 1), expiration};
        headers[nheaders].key = (amqp_bytes_t){sizeof RB_DEADLINE_HEADER - 1, (void *)RB_DEADLINE_HEADER};
        headers[nheaders].value.kind = AMQP_FIELD_KIND_I64;
        headers[nheaders++].value.value.i64 = rb_epoch_ms() + (int64_t)ms;
    }
    headers[nheaders].key = (amqp_bytes_t){sizeof RB_TRACEPARENT_HEADER - 1, (void *)RB_TRACEPARENT_HEADER};
    headers[nheaders].value.kind = AMQP_FIELD_KIND_UTF8;
    headers[nheaders++].value.value.bytes = (amqp_bytes_t){RB_TRACEPARENT_LEN, k->traceparent};
    props._flags |= AMQP_BASIC_HEADERS_FLAG;
    props.headers = (amqp_table_t){nheaders, headers};
    /* Published first, tracked after: a publish that fails never reached
     * the broker, so the caller can queue the call for the reconnection
     * instead of failing it with the calls the lost link takes along. A
     * reply cannot overtake us: frames are read only once we return. */
    pubchan *pc = c->pub;
    if (rb_link_publish(c->link, pc->number, RB_RPC_EXCHANGE, k->routing_key, 1, &props, body, len) < 0)
        return -1;
    uint64_t seq = pc->next_seq++;
    uint64_t end = rb_link_gathered_end(c->link);
    if (calls_add(c, k) < 0 || remember_unconfirmed(pc, seq, k->cid, k->key_hash, end) < 0 ||
        keep_request(pc, k, body, len, end > rb_link_written(c->link)) < 0) {
        calls_take(c, k->cid);
        snprintf(k->message, sizeof k->message, "out of memory");
        call_finish(k, CALL_CONNECTION);
        return -1;
    }
    return 0;
}

/* The wait of a call made inside a task with a deadline (a handler serving
 * a caller who set a timeout) is clipped to the time its caller has left. */
static double clip_timeout(client *c, lua_State *L, double timeout, int *clipped) {
    double left = rb_task_time_left(rb_task_current(c->sched, L));
    *clipped = left != HUGE_VAL && (timeout == 0 || left < timeout);
    if (!*clipped) return timeout;
    return left > 0.001 ? left : 0.001;
}

/* Takes a copy of the request for publishing once the link is back. */
static int queue_call(client *c, call *k, const char *body, size_t len) {
    if (keep_body(k, body, len) < 0) return -1;
    enqueue(c, k);
    return 0;
}

/* ---- core.client_request ---- */

enum { ARG_CLIENT = 1, ARG_NAME, ARG_ARGS, ARG_KWARGS, ARG_FTYPE, ARG_OPTS, ARG_DEFAULT_TIMEOUT };

/* A call's arguments, checked. */
typedef struct {
    const char *name;
    char routing_key[256];
    size_t rklen;
    int name_at;
    double timeout; /* 0: no limit */
    rb_request_shape shape;
    char traceparent[RB_TRACEPARENT_LEN + 1];
} request;

static int bad_request(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int bad_request(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

/* A value as a message shows it: numbers and strings as tostring writes
 * them, anything else by its type. */
static const char *shown(lua_State *L, int idx) {
    if (lua_type(L, idx) != LUA_TNUMBER && lua_type(L, idx) != LUA_TSTRING) return luaL_typename(L, idx);
    lua_pushvalue(L, idx);
    return lua_tostring(L, -1); /* the copy stays on the stack while the message is made */
}

/* opts.timeout when opts has one, else the client's. */
static int read_timeout(lua_State *L, request *rq, char *err, size_t errlen) {
    int idx = ARG_DEFAULT_TIMEOUT;
    if (lua_istable(L, ARG_OPTS)) {
        lua_getfield(L, ARG_OPTS, "timeout");
        if (!lua_isnil(L, -1)) idx = lua_gettop(L);
    }
    double t = lua_type(L, idx) == LUA_TNUMBER ? lua_tonumber(L, idx) : -1;
    if (!(t >= 0)) /* NaN too */
        return bad_request(
            err, errlen,
            "timeout must be a non-negative number of seconds (0 or math.huge: no limit), got %s",
            shown(L, idx));
    if (isinf(t)) t = 0; /* no limit, as 0 */
    rq->timeout = t > MAX_TIMEOUT_S ? MAX_TIMEOUT_S : t;
    return 0;
}

/* The request's traceparent: a new span of opts.traceparent's trace, else
 * of the trace of the call the running task serves, else a new trace. */
static int read_traceparent(lua_State *L, rb_sched *s, request *rq, char *err, size_t errlen) {
    rb_trace parent, t;
    int have = 0;
    if (lua_istable(L, ARG_OPTS)) {
        lua_getfield(L, ARG_OPTS, "traceparent");
        size_t n = 0;
        const char *tp = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
        if (!lua_isnil(L, -1) && (!tp || n != RB_TRACEPARENT_LEN || memcmp(tp, "00-", 3) != 0 ||
                                  rb_trace_parse(tp, n, &parent) < 0))
            return bad_request(err, errlen,
                               "traceparent must be a W3C traceparent, 00-<32 hex>-<16 hex>-<2 hex>");
        have = tp != NULL;
        lua_pop(L, 1);
    }
    if (!have) {
        rb_task *task = rb_task_current(s, L);
        const char *current = task ? rb_task_traceparent(task) : "";
        have = *current && rb_trace_parse(current, RB_TRACEPARENT_LEN, &parent) == 0;
    }
    if (have)
        rb_trace_child(&parent, &t);
    else
        rb_trace_start(&t);
    rb_trace_format(&t, rq->traceparent);
    return 0;
}

/* Checks name, args, kwargs, ftype and opts as remote_call takes them. */
static int read_request(lua_State *L, rb_sched *s, request *rq, char *err, size_t errlen) {
    size_t nlen = 0, ftlen = 5;
    rq->name = lua_type(L, ARG_NAME) == LUA_TSTRING ? lua_tolstring(L, ARG_NAME, &nlen) : NULL;
    if (!rq->name || nlen == 0) return bad_request(err, errlen, "function name must be a non-empty string");
    if (rb_request_shape_of(L, ARG_ARGS, ARG_KWARGS, &rq->shape, err, errlen) < 0) return -1;
    const char *ftype = "async";
    if (!lua_isnil(L, ARG_FTYPE)) {
        ftype = lua_type(L, ARG_FTYPE) == LUA_TSTRING ? lua_tolstring(L, ARG_FTYPE, &ftlen) : "";
        if (!(ftlen == 5 && !memcmp(ftype, "async", 5)) && !(ftlen == 4 && !memcmp(ftype, "sync", 4)))
            return bad_request(err, errlen, "ftype must be 'async' or 'sync', got %s", shown(L, ARG_FTYPE));
    }
    if (!lua_isnil(L, ARG_OPTS) && !lua_istable(L, ARG_OPTS))
        return bad_request(err, errlen, "opts must be a table or nil");
    if (read_timeout(L, rq, err, errlen) < 0 || read_traceparent(L, s, rq, err, errlen) < 0) return -1;
    rq->rklen = ftlen + 1 + nlen;
    if (rq->rklen >= sizeof rq->routing_key)
        return bad_request(err, errlen,
                           "function name too long: its routing key would be %zu bytes, at most %zu",
                           rq->rklen, sizeof rq->routing_key - 1);
    memcpy(rq->routing_key, ftype, ftlen);
    rq->routing_key[ftlen] = '_';
    memcpy(rq->routing_key + ftlen + 1, rq->name, nlen + 1);
    rq->name_at = (int)ftlen + 1;
    return 0;
}

/* Where requests are written, by every client of the process (one loop
 * thread); a fresh one (pushed) should a __gc run by an allocation make a
 * request while it is in use. Not a client's: that __gc may close it. */
static rb_outbuf request_buf;

static rb_outbuf *take_request_buf(lua_State *L) {
    rb_outbuf *b = request_buf.busy ? rb_outbuf_new(L) : &request_buf;
    b->busy = 1;
    b->len = 0;
    return b;
}

/* Publishes the call with body (or queues it for the link), its request
 * checked. NULL, having pushed the failure (set *nresults), or the call to
 * wait for. */
static call *send_call(lua_State *L, client *c, const request *rq, const char *body, size_t len,
                       int *nresults) {
    int link_up = rb_link_check_alive(c->link);
    if (link_up && (!c->reply_ok || !c->pub)) {
        char err[600];
        if (setup_channels(c, err, sizeof err) < 0) {
            *nresults = push_failure(L, "connection", err, rq->name, rq->traceparent);
            return NULL;
        }
        publish_queued(c); /* kept while there was no channel */
    }
    int z = rb_body_compress(body, len, c->compress_threshold, &c->scratch);
    if (z < 0) {
        *nresults = push_failure(L, "invalid_argument", "cannot compress the request body", rq->name,
                                 rq->traceparent);
        return NULL;
    }
    call *k = call_new();
    if (!k) return NULL;
    rb_wait_init(&k->wait, c->sched, &call_ops);
    k->owner = c;
    k->ser = c->ser;
    k->cid = c->next_cid;
    c->next_cid = (c->next_cid + 1) % c->cid_max;
    k->timeout = clip_timeout(c, L, rq->timeout, &k->clipped);
    memcpy(k->routing_key, rq->routing_key, rq->rklen + 1);
    k->name_at = rq->name_at;
    k->key_hash = key_hash_of(rq->routing_key, rq->rklen);
    memcpy(k->traceparent, rq->traceparent, sizeof k->traceparent);
    rb_timer_init(&k->timer, call_timed_out, k);
    const char *out = z ? c->scratch.data : body;
    size_t outlen = z ? c->scratch.len : len;
    /* Reconnecting (or the link died as we published): the call waits for
     * the link within its own timeout. */
    if ((!link_up || (publish_call(c, k, out, outlen) < 0 && !k->wait.woken)) &&
        queue_call(c, k, out, outlen) < 0) {
        call_release(&k->wait);
        return NULL;
    }
    if (k->timeout > 0 && !k->wait.woken) arm_timeout(c, k);
    return k;
}

/* core.client_request(client | nil, name, args, kwargs, ftype, opts,
 * default_timeout): the whole of remote_call but the decoding of a reply
 * of no plain shape. -> true, 0, result | true, 1, the remote error,
 * traceparent | false, 1, error value | nil, reply body, traceparent (the
 * caller decodes it). Misuse is an invalid_argument error value, never
 * raised: try_remote_call never raises. */
int rb_api_client_request(lua_State *L) {
    lua_settop(L, ARG_DEFAULT_TIMEOUT);
    request rq;
    char err[RB_REQUEST_ERROR_MAX + 64];
    if (read_request(L, rb_sched_of(L), &rq, err, sizeof err) < 0)
        return push_failure(L, "invalid_argument", err, NULL, NULL);
    if (lua_isnil(L, ARG_CLIENT))
        return push_failure(L, "connection", "the client is not connected (call :connect() first)", NULL,
                            NULL);
    client **cp = check_client(L), *c = *cp;
    if (!c) return push_failure(L, "connection", "the client is closed", rq.name, rq.traceparent);
    rb_outbuf *b = take_request_buf(L);
    int rc =
        c->ser->write_request(L, ARG_ARGS, ARG_KWARGS, &rq.shape, rb_push_array_mt(L), b, err, sizeof err);
    if (rc == 0 && *cp != c) { /* a __gc run while writing closed it */
        rb_outbuf_done(b);
        return push_failure(L, "connection", "the client was closed", rq.name, rq.traceparent);
    }
    int nresults = 0;
    call *k = rc == 0 ? send_call(L, c, &rq, b->data ? b->data : "", b->len, &nresults) : NULL;
    rb_outbuf_done(b);
    if (rc == -1) return push_failure(L, "invalid_argument", err, NULL, NULL);
    if (k) return rb_wait_for(L, &k->wait);
    if (nresults) return nresults;
    return luaL_error(L, "call: out of memory");
}

static void client_free(client *c) {
    c->closed = 1;
    rb_link_open_abandon(c->opening);
    c->opening = NULL;
    rb_timer_stop(c->loop, &c->reconnect_timer);
    rb_timer_stop(c->loop, &c->switch_timer);
    fail_all(c, CALL_CONNECTION, "the client was closed");
    fail_queued(c, "the client was closed");
    rb_deadlines_stop(&c->timed); /* stopped with its last call already; the client goes */
    if (c->pub) pubchan_free(c->pub);
    c->pub = NULL;
    while (c->draining) {
        pubchan *next = c->draining->next_draining;
        pubchan_free(c->draining);
        c->draining = next;
    }
    rb_link_close(c->link);
    free(c->buckets);
    rb_buf_free(&c->scratch);
    free(c);
}

static int api_client_close(lua_State *L) {
    client **cp = check_client(L);
    if (*cp) {
        client_free(*cp);
        *cp = NULL;
    }
    return 0;
}

static int api_client_is_open(lua_State *L) {
    lua_pushboolean(L, open_client(L) != NULL);
    return 1;
}

static int api_client_reply_queue(lua_State *L) {
    client *c = open_client(L);
    if (!c) return 0;
    lua_pushstring(L, c->reply_queue);
    return 1;
}

static int api_client_pending(lua_State *L) {
    client **cp = check_client(L);
    lua_pushinteger(L, *cp ? (lua_Integer)(*cp)->ncalls : 0);
    return 1;
}

const luaL_Reg rb_client_methods[] = {{"close", api_client_close},
                                      {"is_open", api_client_is_open},
                                      {"reply_queue", api_client_reply_queue},
                                      {"pending", api_client_pending},
                                      {NULL, NULL}};

int rb_api_client_gc(lua_State *L) {
    return api_client_close(L);
}

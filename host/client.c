/* The RPC client: one link, one channel in confirm mode, one server-named
 * exclusive reply queue consumed without acks. client:call() publishes a
 * request and waits (yields, or drives the loop) for whichever comes first:
 * the reply, a nack (queue full), a return (no route), the timeout, or the
 * loss of the connection. Serialisation is the Lua layer's; bodies here are
 * bytes, compressed above the threshold and decompressed on arrival. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"

#include <math.h>

#include "bind.h"
#include "codec.h"
#include "link.h"
#include "log.h"
#include "task.h"
#include "trace.h"
#include "values.h"
#include "wire.h"

#define CLIENT_CHANNEL 1
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

static const char *const outcome_kind[] = {"pending",  "ok",         "timeout",  "queue_full",
                                           "no_route", "connection", "protocol", "not_accepted"};

typedef struct client client;

typedef struct call {
    rb_wait wait;
    client *owner;
    uint64_t cid;
    uint64_t seq; /* publisher-confirm sequence number */
    rb_timer timer;
    double timeout;
    int clipped; /* timeout is what the caller's caller had left */
    int outcome;
    rb_buf reply;
    char message[400];
    char routing_key[256];
    char traceparent[RB_TRACEPARENT_LEN + 1]; /* "" when the caller gave none */
    struct call *next_in_bucket;
    /* made while the link was down: published once it is back */
    int queued;
    rb_buf request;
    struct call *next_queued;
} call;

typedef struct {
    uint64_t seq, cid;
} unconfirmed;

struct client {
    rb_sched *sched;
    rb_loop *loop;
    rb_link *link;
    int channel_ok;
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
    uint64_t next_cid, cid_max, next_seq;
    call **buckets;
    size_t nbuckets, ncalls;
    unconfirmed *unconf; /* publishes awaiting their confirm, in seq order */
    size_t unconf_head, unconf_len, unconf_cap;
    size_t compress_threshold, max_body;
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
    return 0;
}

static call *calls_take(client *c, uint64_t cid) {
    if (!c->nbuckets) return NULL;
    for (call **p = &c->buckets[bucket_of(c, cid)]; *p; p = &(*p)->next_in_bucket) {
        if ((*p)->cid == cid) {
            call *k = *p;
            *p = k->next_in_bucket;
            c->ncalls--;
            return k;
        }
    }
    return NULL;
}

static void call_finish(call *k, int outcome) {
    k->outcome = outcome;
    rb_timer_stop(k->owner->loop, &k->timer);
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
    c->unconf_len = 0;
}

/* The connection or the channel is gone: the calls whose publish the broker
 * had not confirmed yet fail as not accepted, since it never took charge of
 * them (on a cluster a confirm means the queue's replicas have it); a
 * caller may send them again. The confirmed ones stay for fail_all. */
static void fail_unconfirmed(client *c, const char *why) {
    for (size_t i = 0; i < c->unconf_len; i++) {
        call *k = calls_take(c, c->unconf[(c->unconf_head + i) % c->unconf_cap].cid);
        if (!k) continue;
        snprintf(k->message, sizeof k->message,
                 "%s before the broker confirmed the request to '%s': it was not accepted (it may have "
                 "reached the queue, but the broker took no charge of it)",
                 why, k->routing_key);
        call_finish(k, CALL_NOT_ACCEPTED);
    }
    c->unconf_len = 0;
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

static void unqueue(client *c, call *k) {
    for (call **p = &c->queued_head; *p; p = &(*p)->next_queued) {
        if (*p == k) {
            *p = k->next_queued;
            k->queued = 0;
            return;
        }
    }
}

/* ---- link callbacks ---- */

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
    /* Decompressed straight into the call's buffer; a plain body is copied
     * there, since the link reuses its own before the caller resumes. */
    const void *body;
    size_t len;
    if (rb_body_unwrap("reply", m->body, m->body_len, c->max_body, &k->reply, &body, &len, k->message,
                       sizeof k->message) < 0) {
        call_finish(k, CALL_PROTOCOL);
    } else if (body != k->reply.data && rb_buf_reserve(&k->reply, len + 1) < 0) {
        snprintf(k->message, sizeof k->message, "out of memory for the reply");
        call_finish(k, CALL_PROTOCOL);
    } else {
        if (body != k->reply.data) memcpy(k->reply.data, body, len);
        k->reply.len = len;
        call_finish(k, CALL_OK);
    }
}

static void on_return(rb_link *link, void *data, const rb_message *m) {
    (void)link;
    client *c = data;
    call *k = calls_take(c, strtoull(m->correlation_id, NULL, 10));
    if (!k) return;
    snprintf(k->message, sizeof k->message, "no function is served at routing key '%s' (%s)", k->routing_key,
             m->reply_text);
    call_finish(k, CALL_NO_ROUTE);
}

static void on_confirm(rb_link *link, void *data, uint64_t tag, int multiple, int nack) {
    (void)link;
    client *c = data;
    /* Confirms come in publish order in practice; anything at the head up to
     * tag is settled (a single ack out of order settles its head too early,
     * which only means we stop watching for a nack on a published call). */
    while (c->unconf_len > 0) {
        unconfirmed *u = &c->unconf[c->unconf_head];
        if (u->seq > tag) break;
        if (!multiple && u->seq != tag) {
            c->unconf_head = (c->unconf_head + 1) % c->unconf_cap;
            c->unconf_len--;
            continue;
        }
        if (nack) {
            call *k = calls_take(c, u->cid);
            if (k) {
                snprintf(k->message, sizeof k->message,
                         "the queue behind '%s' is full (the broker refused the request)", k->routing_key);
                call_finish(k, CALL_QUEUE_FULL);
            }
        }
        c->unconf_head = (c->unconf_head + 1) % c->unconf_cap;
        c->unconf_len--;
    }
}

static void on_channel_closed(rb_link *link, void *data, const char *why, int channel_open) {
    (void)link;
    (void)channel_open;
    client *c = data;
    char msg[320];
    snprintf(msg, sizeof msg, "the broker closed the client channel: %s", why);
    c->channel_ok = 0;
    fail_unconfirmed(c, "the client channel closed");
    fail_all(c, CALL_CONNECTION, msg);
}

static void on_lost(rb_link *link, void *data, const char *why) {
    client *c = data;
    char msg[320];
    snprintf(msg, sizeof msg, "connection to the broker lost: %s", why);
    c->channel_ok = 0;
    /* Back through another node: this one may be down. */
    c->first_url = rb_link_url_index(link) + 1;
    /* Calls in flight fail now rather than at their timeout: their replies
     * would go to a reply queue that died with the connection. */
    fail_unconfirmed(c, "connection to the broker lost");
    fail_all(c, CALL_CONNECTION, msg);
    c->backoff = 0.1;
    rb_timer_start(c->loop, &c->reconnect_timer, c->backoff);
}

static const rb_channel_handler client_handler = {on_reply, on_return, on_confirm, on_channel_closed};

/* ---- set-up ---- */

/* The client channel in confirm mode and its reply queue, consumed: what a
 * link needs before it carries calls. It touches the link alone (an
 * opening runs it on its own thread, before the link has a loop), and
 * writes the reply queue's name to out; channel_ready makes the client use
 * it. */
static int reply_channel_setup(rb_link *link, char *out, size_t outlen, char *err, size_t errlen) {
    amqp_connection_state_t conn = rb_link_conn(link);
    if (rb_link_channel_open(link, CLIENT_CHANNEL, &client_handler, NULL, err, errlen) < 0) return -1;
    amqp_confirm_select(conn, CLIENT_CHANNEL);
    if (rb_link_check_reply(link, CLIENT_CHANNEL, "confirm.select", err, errlen) < 0) return -1;
    /* Declared by servers too; declaring it here means a call made before any
     * server ever ran is a clean no_route, not a channel-killing NOT_FOUND. */
    amqp_exchange_declare(conn, CLIENT_CHANNEL, amqp_cstring_bytes(RB_RPC_EXCHANGE),
                          amqp_cstring_bytes(RB_RPC_EXCHANGE_TYPE), 0, 1, 0, 0, amqp_empty_table);
    if (rb_link_check_reply(link, CLIENT_CHANNEL, "exchange.declare rpc", err, errlen) < 0) return -1;
    amqp_queue_declare_ok_t *q =
        amqp_queue_declare(conn, CLIENT_CHANNEL, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    if (rb_link_check_reply(link, CLIENT_CHANNEL, "queue.declare (reply queue)", err, errlen) < 0) return -1;
    snprintf(out, outlen, "%.*s", (int)q->queue.len, (char *)q->queue.bytes);
    amqp_basic_consume(conn, CLIENT_CHANNEL, q->queue, amqp_empty_bytes, 0, 1, 1, amqp_empty_table);
    if (rb_link_check_reply(link, CLIENT_CHANNEL, "basic.consume (reply queue)", err, errlen) < 0) return -1;
    return 0;
}

static void channel_ready(client *c, const char *reply_queue) {
    rb_link_channel_bind(c->link, CLIENT_CHANNEL, &client_handler, c);
    snprintf(c->reply_queue, sizeof c->reply_queue, "%s", reply_queue);
    c->next_seq = 1;
    c->unconf_len = 0;
    c->channel_ok = 1;
}

/* The channel again on a live link (after the broker closed it): the
 * broker answered a moment ago, so these round trips stay on the loop. */
static int setup_channel(client *c, char *err, size_t errlen) {
    char reply_queue[256];
    if (reply_channel_setup(c->link, reply_queue, sizeof reply_queue, err, errlen) < 0) return -1;
    channel_ready(c, reply_queue);
    return 0;
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
}

static int publish_call(client *c, call *k, const void *body, size_t len);

/* Publishes the calls made while there was no link, in order. */
static void publish_queued(client *c) {
    call *k;
    while ((k = c->queued_head) != NULL && rb_link_is_open(c->link)) {
        c->queued_head = k->next_queued;
        k->queued = 0;
        if (publish_call(c, k, k->request.data, k->request.len) == 0) {
            rb_buf_free(&k->request);
        } else if (!k->wait.woken) {
            k->queued = 1; /* lost again already: wait for the next link */
            k->next_queued = c->queued_head;
            c->queued_head = k;
        }
    }
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
    c->opening = rb_link_open_start(&opts, reply_channel_setup, on_reconnected, c, err, sizeof err);
    if (!c->opening) reconnect_later(c, err);
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

static const rb_wait_ops open_ops = {open_push, open_detach, open_release};

/* core.client_open(url, { heartbeat=, connect_timeout=, cid_max=, compress_threshold=, max_body=,
 *                         name=, tls= }) -> client | nil, error */
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
    c->compress_threshold = threshold;
    c->max_body = max_body;
    /* A random start makes two clients sharing a reply path unlikely to
     * collide, as RabiBridge does. */
    c->next_cid = rb_random64() % c->cid_max;
    rb_wait_init(&ow->wait, s, &open_ops);
    ow->c = c;
    c->first_open = ow;
    rb_link_options opts;
    link_options(c, &opts);
    c->opening = rb_link_open_start(&opts, reply_channel_setup, on_first_open, c, ow->err, sizeof ow->err);
    if (!c->opening) {
        c->first_open = NULL;
        rb_wait_wake(&ow->wait); /* settled at once, with ow->err */
    }
    return rb_wait_for(L, &ow->wait);
}

static int call_push(rb_wait *w, lua_State *L) {
    call *k = (call *)w;
    if (k->outcome == CALL_OK) {
        lua_pushlstring(L, k->reply.data ? k->reply.data : "", k->reply.len);
        return 1;
    }
    lua_pushnil(L);
    rb_new_error(L, outcome_kind[k->outcome], k->message);
    return 2;
}

/* Cancelled: the call leaves the client's books, so that a reply, a nack
 * or a return that comes later finds nobody. */
static void call_detach(rb_wait *w) {
    call *k = (call *)w;
    rb_timer_stop(k->owner->loop, &k->timer);
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

static call *call_new(void) {
    if (nspare_calls == 0) return calloc(1, sizeof(call));
    call *k = spare_calls[--nspare_calls];
    memset(k, 0, sizeof *k);
    return k;
}

static void call_release(rb_wait *w) {
    call *k = (call *)w;
    rb_buf_free(&k->reply);
    rb_buf_free(&k->request);
    if (nspare_calls < SPARE_CALLS)
        spare_calls[nspare_calls++] = k;
    else
        free(k);
}

static const rb_wait_ops call_ops = {call_push, call_detach, call_release};

static void call_timed_out(rb_loop *loop, void *data) {
    (void)loop;
    call *k = data;
    if (k->queued) {
        unqueue(k->owner, k);
        snprintf(k->message, sizeof k->message, "no connection to the broker within %g s", k->timeout);
    } else if (calls_take(k->owner, k->cid)) {
        snprintf(k->message, sizeof k->message, "no reply from '%s' within %g s%s", k->routing_key,
                 k->timeout, k->clipped ? " (the time left before its own caller's deadline)" : "");
    } else {
        return;
    }
    call_finish(k, CALL_TIMEOUT);
}

static int remember_unconfirmed(client *c, uint64_t seq, uint64_t cid) {
    if (c->unconf_len == c->unconf_cap) {
        size_t cap = c->unconf_cap ? c->unconf_cap * 2 : 256;
        unconfirmed *grown = malloc(cap * sizeof *grown);
        if (!grown) return -1;
        for (size_t i = 0; i < c->unconf_len; i++) grown[i] = c->unconf[(c->unconf_head + i) % c->unconf_cap];
        free(c->unconf);
        c->unconf = grown;
        c->unconf_cap = cap;
        c->unconf_head = 0;
    }
    c->unconf[(c->unconf_head + c->unconf_len) % c->unconf_cap] = (unconfirmed){seq, cid};
    c->unconf_len++;
    return 0;
}

/* Publishes k (already carrying its cid and routing key). 0, or -1 when the
 * link failed under us before the request went out (k is left to the
 * caller) or k could not be tracked (k is failed). */
static int publish_call(client *c, call *k, const void *body, size_t len) {
    /* rb_format_uint64, not snprintf: twice per call, and snprintf costs
     * more than the rest of the properties together. */
    char cid[24];
    rb_format_uint64(cid, k->cid);
    amqp_basic_properties_t props;
    props._flags = AMQP_BASIC_CORRELATION_ID_FLAG | AMQP_BASIC_REPLY_TO_FLAG;
    props.correlation_id = amqp_cstring_bytes(cid);
    props.reply_to = amqp_cstring_bytes(c->reply_queue);
    /* With a timeout, the request expires in its queue a little before its
     * caller gives up (expiration), early enough that the host which takes
     * expired requests (server.c's answer_timeouts) can still answer it
     * with a timeout error; a server that takes it late answers so too
     * (header). */
    char expiration[24];
    amqp_table_entry_t headers[2];
    int nheaders = 0;
    if (k->timeout > 0) {
        uint64_t ms = (uint64_t)(k->timeout * 1000.0 + 0.5);
        uint64_t early = ms / 10 < EXPIRY_LEAD_MAX_MS ? ms / 10 : EXPIRY_LEAD_MAX_MS;
        rb_format_uint64(expiration, ms - early ? ms - early : 1);
        props._flags |= AMQP_BASIC_EXPIRATION_FLAG;
        props.expiration = amqp_cstring_bytes(expiration);
        headers[nheaders].key = amqp_cstring_bytes(RB_DEADLINE_HEADER);
        headers[nheaders].value.kind = AMQP_FIELD_KIND_I64;
        headers[nheaders++].value.value.i64 = rb_epoch_ms() + (int64_t)ms;
    }
    if (*k->traceparent) {
        headers[nheaders].key = amqp_cstring_bytes(RB_TRACEPARENT_HEADER);
        headers[nheaders].value.kind = AMQP_FIELD_KIND_UTF8;
        headers[nheaders++].value.value.bytes = amqp_cstring_bytes(k->traceparent);
    }
    if (nheaders) {
        props._flags |= AMQP_BASIC_HEADERS_FLAG;
        props.headers = (amqp_table_t){nheaders, headers};
    }
    /* Published first, tracked after: a publish that fails never reached
     * the broker, so the caller can queue the call for the reconnection
     * instead of failing it with the calls the lost link takes along. A
     * reply cannot overtake us: frames are read only once we return. */
    if (rb_link_publish(c->link, CLIENT_CHANNEL, RB_RPC_EXCHANGE, k->routing_key, 1, &props, body, len) < 0)
        return -1;
    uint64_t seq = c->next_seq++;
    if (calls_add(c, k) < 0 || remember_unconfirmed(c, seq, k->cid) < 0) {
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
    if (rb_buf_reserve(&k->request, len + 1) < 0) return -1;
    memcpy(k->request.data, body, len);
    k->request.len = len;
    k->queued = 1;
    call **tail = &c->queued_head;
    while (*tail) tail = &(*tail)->next_queued;
    *tail = k;
    return 0;
}

/* client:call(routing_key, body [, timeout [, traceparent]]) -> reply | nil, error */
static int api_client_call(lua_State *L) {
    client **cp = check_client(L);
    size_t rklen, len, tplen = 0;
    const char *rk = luaL_checklstring(L, 2, &rklen);
    const char *body = luaL_checklstring(L, 3, &len);
    double timeout = luaL_optnumber(L, 4, 0);
    const char *traceparent = luaL_optlstring(L, 5, "", &tplen);
    luaL_argcheck(L, rklen < 256, 2, "routing key longer than 255 bytes");
    luaL_argcheck(L, timeout >= 0, 4, "expected a non-negative timeout in seconds");
    if (isinf(timeout)) timeout = 0; /* no limit, as 0 */
    if (timeout > MAX_TIMEOUT_S) timeout = MAX_TIMEOUT_S;
    rb_trace checked;
    luaL_argcheck(L, tplen == 0 || rb_trace_parse(traceparent, tplen, &checked) == 0, 5,
                  "expected a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)");
    client *c = *cp;
    if (!c) return rb_fail(L, "connection", "the client is closed");
    int link_up = rb_link_check_alive(c->link);
    if (link_up && !c->channel_ok) {
        char err[600];
        if (setup_channel(c, err, sizeof err) < 0) return rb_fail(L, "connection", "%s", err);
    }
    int clipped;
    timeout = clip_timeout(c, L, timeout, &clipped);
    int z = rb_body_compress(body, len, c->compress_threshold, &c->scratch);
    if (z < 0) return rb_fail(L, "invalid_argument", "cannot compress the request body");
    call *k = call_new();
    if (!k) return luaL_error(L, "call: out of memory");
    rb_wait_init(&k->wait, c->sched, &call_ops);
    k->owner = c;
    k->cid = c->next_cid;
    c->next_cid = (c->next_cid + 1) % c->cid_max;
    k->timeout = timeout;
    k->clipped = clipped;
    memcpy(k->routing_key, rk, rklen + 1);
    /* A valid traceparent of a later version may be longer: what follows
     * the fields we know is not ours to forward. */
    if (tplen) rb_trace_format(&checked, k->traceparent);
    rb_timer_init(&k->timer, call_timed_out, k);
    const char *out = z ? c->scratch.data : body;
    size_t outlen = z ? c->scratch.len : len;
    /* Reconnecting (or the link died as we published): the call waits for
     * the link within its own timeout. */
    if ((!link_up || (publish_call(c, k, out, outlen) < 0 && !k->wait.woken)) &&
        queue_call(c, k, out, outlen) < 0) {
        call_release(&k->wait);
        return luaL_error(L, "call: out of memory");
    }
    if (timeout > 0 && !k->wait.woken) rb_timer_start(c->loop, &k->timer, timeout);
    return rb_wait_for(L, &k->wait);
}

static void client_free(client *c) {
    c->closed = 1;
    rb_link_open_abandon(c->opening);
    c->opening = NULL;
    rb_timer_stop(c->loop, &c->reconnect_timer);
    fail_all(c, CALL_CONNECTION, "the client was closed");
    fail_queued(c, "the client was closed");
    rb_link_close(c->link);
    free(c->buckets);
    free(c->unconf);
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

const luaL_Reg rb_client_methods[] = {
    {"call", api_client_call},       {"close", api_client_close},
    {"is_open", api_client_is_open}, {"reply_queue", api_client_reply_queue},
    {"pending", api_client_pending}, {NULL, NULL}};

int rb_api_client_gc(lua_State *L) {
    return api_client_close(L);
}

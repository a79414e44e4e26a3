/* Discovery (see discovery.h): a worker's answerer, and the asker that
 * rabi.discover drives. Both are small on purpose: the answer is made in Lua
 * once, and the asker only gathers bytes and counts; merging them is Lua's
 * (lua/rabibridge/discovery.lua). */
#include "discovery.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bind.h"
#include "log.h"
#include "task.h"
#include "trace.h"
#include "wire.h"

/* Answers beyond this many to one request are dropped: a broker with that
 * many workers has a problem no listing solves. */
#define MAX_ANSWERS 100000

/* ---- the answering side ---- */

struct rb_discovery {
    char *answer;
    size_t len;
    int stopped;
};

rb_discovery *rb_discovery_new(const char *answer, size_t len) {
    rb_discovery *d = calloc(1, sizeof *d);
    if (!d) return NULL;
    d->answer = malloc(len ? len : 1);
    if (!d->answer) {
        free(d);
        return NULL;
    }
    memcpy(d->answer, answer, len);
    d->len = len;
    return d;
}

void rb_discovery_free(rb_discovery *d) {
    if (!d) return;
    free(d->answer);
    free(d);
}

void rb_discovery_stop(rb_discovery *d) {
    if (d) d->stopped = 1;
}

static void on_request(rb_link *link, void *data, const rb_message *m) {
    rb_discovery *d = data;
    if (d->stopped || !m->has_reply_to || !*m->reply_to) return;
    amqp_basic_properties_t props;
    props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG;
    props.content_type = amqp_cstring_bytes("application/json");
    if (m->has_correlation_id) {
        props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
        props.correlation_id = amqp_cstring_bytes(m->correlation_id);
    }
    rb_link_publish(link, m->channel, "", m->reply_to, 0, &props, d->answer, d->len);
}

static void on_answerer_closed(rb_link *link, void *data, const char *why, int channel_open) {
    (void)link;
    (void)data;
    (void)channel_open;
    /* Its queue is exclusive to this connection: only the broker itself can
     * have closed it. The next reconnection attaches it again. */
    rb_log(RB_LOG_WARN, "discovery: no longer answering rabihost list: %s", why);
}

static const rb_channel_handler answerer_handler = {on_request, NULL, NULL, on_answerer_closed};

int rb_discovery_attach(rb_discovery *d, rb_link *link, amqp_channel_t ch, char *err, size_t errlen) {
    if (rb_link_channel_open(link, ch, &answerer_handler, d, err, errlen) < 0) return -1;
    amqp_connection_state_t conn = rb_link_conn(link);
    /* Server-named, exclusive and auto-delete: it lives exactly as long as
     * this worker's connection, and no one else can consume it. */
    amqp_queue_declare_ok_t *q = amqp_queue_declare(conn, ch, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    if (rb_link_check_reply(link, ch, "queue.declare (discovery)", err, errlen) < 0) return -1;
    amqp_bytes_t queue = amqp_bytes_malloc_dup(q->queue);
    if (!queue.bytes) {
        snprintf(err, errlen, "discovery: out of memory");
        return -1;
    }
    amqp_queue_bind(conn, ch, queue, amqp_cstring_bytes(RB_RPC_EXCHANGE),
                    amqp_cstring_bytes(RB_DISCOVERY_KEY), amqp_empty_table);
    int rc = rb_link_check_reply(link, ch, "queue.bind (discovery)", err, errlen);
    if (rc == 0) {
        /* No acks: a request lost with the worker is only a worker missing
         * from one listing. */
        amqp_basic_consume(conn, ch, queue, amqp_empty_bytes, 0, 1, 1, amqp_empty_table);
        rc = rb_link_check_reply(link, ch, "basic.consume (discovery)", err, errlen);
    }
    amqp_bytes_free(queue);
    return rc;
}

/* ---- the asking side ---- */

#define ASK_CHANNEL 1   /* the reply queue, and the requests */
#define COUNT_CHANNEL 2 /* passive declares: a missing queue closes it */

typedef struct asker asker;

/* One ask: the answers gathered until the window closes. */
typedef struct {
    rb_wait wait;
    rb_timer timer;
    asker *owner; /* NULL once it no longer gathers */
    char **answers;
    size_t *lens;
    int n, cap;
    int returned; /* nobody is bound to the key: no rabihost serves here */
    char failed[320];
} gather;

struct asker {
    rb_sched *sched;
    rb_loop *loop;
    rb_link *link;
    int count_channel_open;
    char reply_queue[256];
    char cid[32];
    unsigned long long next_cid;
    gather *pending;
};

/* The gather stops gathering: what came is what it has. */
static void gather_end(gather *g) {
    if (g->owner) g->owner->pending = NULL;
    g->owner = NULL;
    rb_timer_stop(rb_sched_loop(g->wait.sched), &g->timer);
    rb_wait_wake(&g->wait);
}

static void gather_failed(gather *g, const char *why) {
    snprintf(g->failed, sizeof g->failed, "%s", why);
    gather_end(g);
}

static int keep_answer(gather *g, const void *body, size_t len) {
    if (g->n == g->cap) {
        int cap = g->cap ? g->cap * 2 : 16;
        char **answers = realloc(g->answers, (size_t)cap * sizeof *answers);
        if (!answers) return -1;
        g->answers = answers;
        size_t *lens = realloc(g->lens, (size_t)cap * sizeof *lens);
        if (!lens) return -1;
        g->lens = lens;
        g->cap = cap;
    }
    char *copy = malloc(len ? len : 1);
    if (!copy) return -1;
    memcpy(copy, body, len);
    g->answers[g->n] = copy;
    g->lens[g->n++] = len;
    return 0;
}

static void on_answer(rb_link *link, void *data, const rb_message *m) {
    (void)link;
    asker *a = data;
    gather *g = a->pending;
    /* A late answer to an earlier ask, or one too large to hold. */
    if (!g || strcmp(m->correlation_id, a->cid) != 0 || !m->body || g->n >= MAX_ANSWERS) return;
    if (keep_answer(g, m->body, m->body_len) < 0) gather_failed(g, "out of memory for the answers");
}

static void on_returned(rb_link *link, void *data, const rb_message *m) {
    (void)link;
    asker *a = data;
    gather *g = a->pending;
    if (!g || strcmp(m->correlation_id, a->cid) != 0) return;
    g->returned = 1;
    gather_end(g);
}

static void on_ask_closed(rb_link *link, void *data, const char *why, int channel_open) {
    (void)link;
    (void)channel_open;
    asker *a = data;
    if (a->pending) gather_failed(a->pending, why);
}

static void on_ask_lost(rb_link *link, void *data, const char *why) {
    (void)link;
    asker *a = data;
    if (a->pending) gather_failed(a->pending, why);
}

static const rb_channel_handler ask_handler = {on_answer, on_returned, NULL, on_ask_closed};
static const rb_channel_handler count_handler = {NULL, NULL, NULL, NULL};

static void window_closed(rb_loop *loop, void *data) {
    (void)loop;
    gather_end(data);
}

static int gather_push(rb_wait *w, lua_State *L) {
    gather *g = (gather *)w;
    if (g->failed[0]) {
        lua_pushnil(L);
        rb_new_error(L, "connection", g->failed);
        return 2;
    }
    lua_createtable(L, g->n, 0);
    for (int i = 0; i < g->n; i++) {
        lua_pushlstring(L, g->answers[i], g->lens[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_pushboolean(L, !g->returned);
    return 2;
}

static void gather_detach(rb_wait *w) {
    gather *g = (gather *)w;
    if (g->owner) g->owner->pending = NULL;
    g->owner = NULL;
    rb_timer_stop(rb_sched_loop(w->sched), &g->timer);
}

static void gather_release(rb_wait *w) {
    gather *g = (gather *)w;
    for (int i = 0; i < g->n; i++) free(g->answers[i]);
    free(g->answers);
    free(g->lens);
    free(g);
}

static const rb_wait_ops gather_ops = {gather_push, gather_detach, gather_release, NULL};

static asker *check_asker(lua_State *L) {
    asker **ap = luaL_checkudata(L, 1, RB_DISCOVERY_CLASS);
    if (!*ap) luaL_argerror(L, 1, "discovery already closed");
    return *ap;
}

/* The lister's channel and its answer queue, on the opening's own thread
 * (rb_link_open_start): it touches the link alone and writes the queue's
 * name to out; asker_opened binds the channel to the asker on the loop. */
static int asker_setup(rb_link *link, char *out, size_t outlen, char *err, size_t errlen) {
    /* The exchange declared here too, so that asking a broker no server
     * ever used is an empty answer. */
    if (rb_link_channel_open(link, ASK_CHANNEL, &ask_handler, NULL, err, errlen) < 0 ||
        rb_link_declare_rpc_exchange(link, ASK_CHANNEL, err, errlen) < 0)
        return -1;
    return rb_link_consume_private_queue(link, ASK_CHANNEL, "answers", out, outlen, err, errlen);
}

/* discovery_open waits for the connection without holding up the loop, as
 * a client does: a frozen broker costs the lister, never a worker serving
 * beside it. Until the wait pushes it, the asker is the wait's. */
typedef struct open_wait {
    rb_wait wait;
    asker *a; /* NULL once the caller has it */
    rb_link_opening *opening;
    size_t max_body;
    char err[600];
} open_wait;

static void asker_opened(void *data, rb_link *link, const char *reply_queue, const char *err) {
    open_wait *ow = data;
    ow->opening = NULL;
    if (link) {
        asker *a = ow->a;
        a->link = link;
        rb_link_channel_bind(link, ASK_CHANNEL, &ask_handler, a);
        snprintf(a->reply_queue, sizeof a->reply_queue, "%s", reply_queue);
        rb_link_on_lost(link, on_ask_lost, a);
        rb_link_set_max_body(link, ow->max_body);
    } else {
        snprintf(ow->err, sizeof ow->err, "%s", err);
    }
    rb_wait_wake(&ow->wait);
}

static int open_push(rb_wait *w, lua_State *L) {
    open_wait *ow = (open_wait *)w;
    if (!ow->a->link) {
        lua_pushnil(L);
        rb_new_error(L, "connection", ow->err);
        return 2;
    }
    asker **ap = lua_newuserdata(L, sizeof *ap);
    *ap = ow->a;
    ow->a = NULL;
    luaL_getmetatable(L, RB_DISCOVERY_CLASS);
    lua_setmetatable(L, -2);
    return 1;
}

/* Cancelled: the opening is given up, so that a link it makes later is
 * closed rather than handed to an asker about to be freed. */
static void open_detach(rb_wait *w) {
    open_wait *ow = (open_wait *)w;
    rb_link_open_abandon(ow->opening);
    ow->opening = NULL;
}

static void open_release(rb_wait *w) {
    open_wait *ow = (open_wait *)w;
    if (ow->a) {
        rb_link_close(ow->a->link);
        free(ow->a);
    }
    free(ow);
}

static const rb_wait_ops open_ops = {open_push, open_detach, open_release, NULL};

int rb_api_discovery_open(lua_State *L) {
    static const char fname[] = "discovery";
    rb_sched *s = rb_sched_of(L);
    size_t urllen;
    const char *url = luaL_checklstring(L, 1, &urllen);
    luaL_argcheck(L, urllen < 1024, 1, "URL longer than 1023 bytes");
    rb_check_options(L, 2, fname);
    rb_tls_options tls;
    rb_opt_tls(L, 2, fname, &tls);
    size_t threshold, max_body;
    rb_opt_body_limits(L, 2, fname, &threshold, &max_body);
    rb_link_options opts = {rb_sched_loop(s),
                            url,
                            rb_opt_int(L, 2, fname, "heartbeat", 0, 65535, 60),
                            rb_opt_number(L, 2, fname, "connect_timeout", 10),
                            rb_opt_string(L, 2, fname, "name", "rabihost list"),
                            &tls,
                            0};
    asker *a = calloc(1, sizeof *a);
    open_wait *ow = calloc(1, sizeof *ow);
    if (!a || !ow) {
        free(a);
        free(ow);
        return luaL_error(L, "discovery: out of memory");
    }
    a->sched = s;
    a->loop = rb_sched_loop(s);
    a->next_cid = rb_random64();
    rb_wait_init(&ow->wait, s, &open_ops);
    ow->a = a;
    ow->max_body = max_body;
    ow->opening = rb_link_open_start(&opts, asker_setup, asker_opened, ow, ow->err, sizeof ow->err);
    if (!ow->opening) rb_wait_wake(&ow->wait); /* settled at once, with ow->err */
    return rb_wait_for(L, &ow->wait);
}

/* asker:ask(body, window) -> { answer... }, routed | nil, error
 * Publishes body to the discovery key and gathers the answers for window
 * seconds. routed is false when the broker had no queue bound to the key
 * (no rabihost there): the wait ends at once. */
static int api_ask(lua_State *L) {
    asker *a = check_asker(L);
    size_t len;
    const char *body = luaL_checklstring(L, 2, &len);
    double window = luaL_checknumber(L, 3);
    luaL_argcheck(L, window >= 0, 3, "expected a non-negative number of seconds");
    if (a->pending) return luaL_error(L, "ask: another ask of this discovery is still gathering");
    if (!rb_link_check_alive(a->link)) return rb_fail(L, "connection", "%s", rb_link_error(a->link));
    gather *g = calloc(1, sizeof *g);
    if (!g) return luaL_error(L, "ask: out of memory");
    rb_wait_init(&g->wait, a->sched, &gather_ops);
    rb_timer_init(&g->timer, window_closed, g);
    snprintf(a->cid, sizeof a->cid, "%llu", a->next_cid++);
    amqp_basic_properties_t props;
    props._flags = AMQP_BASIC_CORRELATION_ID_FLAG | AMQP_BASIC_REPLY_TO_FLAG | AMQP_BASIC_CONTENT_TYPE_FLAG;
    props.correlation_id = amqp_cstring_bytes(a->cid);
    props.reply_to = amqp_cstring_bytes(a->reply_queue);
    props.content_type = amqp_cstring_bytes("application/json");
    /* mandatory: a broker with no answerer bound returns it, and the ask
     * ends without waiting out the window. */
    if (rb_link_publish(a->link, ASK_CHANNEL, RB_RPC_EXCHANGE, RB_DISCOVERY_KEY, 1, &props, body, len) < 0) {
        free(g);
        return rb_fail(L, "connection", "%s", rb_link_error(a->link));
    }
    if (rb_timer_start(a->loop, &g->timer, window) < 0) {
        free(g);
        return luaL_error(L, "ask: out of memory");
    }
    g->owner = a;
    a->pending = g;
    return rb_wait_for(L, &g->wait);
}

/* asker:queue(name) -> { consumers =, messages = } | nil, error (kind
 * not_found when there is no such queue). A passive queue.declare: the
 * broker's own counts, messages being those ready (not those in flight). */
static int api_queue(lua_State *L) {
    asker *a = check_asker(L);
    size_t len;
    const char *name = luaL_checklstring(L, 2, &len);
    luaL_argcheck(L, len > 0 && len < 256, 2, "expected a queue name of 1 to 255 bytes");
    if (!rb_link_check_alive(a->link)) return rb_fail(L, "connection", "%s", rb_link_error(a->link));
    char err[600];
    if (!a->count_channel_open) {
        if (rb_link_channel_open(a->link, COUNT_CHANNEL, &count_handler, a, err, sizeof err) < 0)
            return rb_fail(L, "connection", "%s", err);
        a->count_channel_open = 1;
    }
    amqp_queue_declare_ok_t *ok = amqp_queue_declare(rb_link_conn(a->link), COUNT_CHANNEL,
                                                     amqp_cstring_bytes(name), 1, 0, 0, 0, amqp_empty_table);
    if (rb_link_check_reply(a->link, COUNT_CHANNEL, "queue.declare (passive)", err, sizeof err) < 0) {
        a->count_channel_open = 0; /* the broker closed it, or the link went */
        int missing = rb_link_is_open(a->link) && strstr(err, "NOT_FOUND") != NULL;
        return rb_fail(L, missing ? "not_found" : "connection", "%s", err);
    }
    lua_createtable(L, 0, 2);
    lua_pushnumber(L, ok->consumer_count);
    lua_setfield(L, -2, "consumers");
    lua_pushnumber(L, ok->message_count);
    lua_setfield(L, -2, "messages");
    return 1;
}

static int api_close(lua_State *L) {
    asker **ap = luaL_checkudata(L, 1, RB_DISCOVERY_CLASS);
    asker *a = *ap;
    if (!a) return 0;
    *ap = NULL;
    if (a->pending) gather_failed(a->pending, "the discovery was closed");
    rb_link_close(a->link);
    free(a);
    return 0;
}

int rb_api_discovery_gc(lua_State *L) {
    return api_close(L);
}

const luaL_Reg rb_discovery_methods[] = {
    {"ask", api_ask}, {"queue", api_queue}, {"close", api_close}, {NULL, NULL}};

int rb_api_hostname(lua_State *L) {
    char name[256];
    if (gethostname(name, sizeof name) < 0) return rb_fail(L, "io", "gethostname: %s", strerror(errno));
    name[sizeof name - 1] = '\0';
    lua_pushstring(L, name);
    return 1;
}

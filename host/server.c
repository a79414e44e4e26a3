/* The serving side of a worker: one link, one channel per function (so that
 * prefetch is per function and a broker error on one queue leaves the others
 * serving), and every delivery run as its own task. The Lua dispatcher turns
 * a request body into a reply body; this file publishes the reply and then
 * acks, so a request is never acked before its answer is out. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "core.h"
#include "lauxlib.h"
#include "link.h"
#include "task.h"

#define SERVER_MT "rabibridge.server"
#define CONTROL_CHANNEL 1
#define RPC_EXCHANGE "rpc"

typedef struct server server;

typedef struct func {
    server *srv;
    amqp_channel_t channel;
    char name[256], queue[256], routing_key[256], consumer_tag[256];
    int fetch_size;
    double queue_size, ttl_ms; /* 0: not set */
    int auto_delete;
    int dispatch_ref;
    int consuming;
    int channel_open;
    rb_timer redeclare_timer; /* after the broker cancelled us */
    long inflight;
} func;

struct server {
    rb_link *link;
    unsigned epoch; /* bumped by every reconnection: delivery tags die with their link */
    char url[1024], name[128];
    rb_tls_options tls;
    int heartbeat;
    double connect_timeout;
    func **funcs;
    int nfuncs;
    long inflight;
    int closing; /* closed with calls in flight: freed by the last of them */
    size_t compress_threshold, max_body;
    rb_buf scratch;
};

static void server_free(server *s);

typedef struct {
    func *f;
    unsigned epoch;
    uint64_t delivery_tag;
    uint64_t started_ms;
    int has_correlation_id;
    char reply_to[256], correlation_id[256];
} server_call;

static void publish_reply(server *s, server_call *sc, const char *body, size_t len) {
    amqp_basic_properties_t props;
    props._flags = 0;
    if (sc->has_correlation_id) {
        props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
        props.correlation_id = amqp_cstring_bytes(sc->correlation_id);
    }
    int z = rb_body_compress(body, len, s->compress_threshold, &s->scratch);
    if (z < 0) {
        rb_log(RB_LOG_ERROR, "%s: cannot compress a reply of %zu bytes", sc->f->name, len);
        return;
    }
    rb_link_publish(s->link, sc->f->channel, "", sc->reply_to, 0, &props, z ? s->scratch.data : body,
                    z ? s->scratch.len : len);
}

static void call_done(rb_task *t, int status, void *data) {
    server_call *sc = data;
    func *f = sc->f;
    server *s = f->srv;
    size_t len;
    const char *reply = status == 0 ? lua_tolstring(t->co, -1, &len) : NULL;
    if (!rb_link_is_open(s->link)) {
        /* No link: the broker requeues the request and it is served again. */
    } else if (reply) {
        /* After a reconnection the reply still goes out (the caller may be
         * waiting), but the old delivery tag means nothing on the new link. */
        publish_reply(s, sc, reply, len);
    } else {
        /* The dispatcher catches handler errors; reaching here is a bug or
         * memory exhaustion. No reply: the caller times out, and we say why. */
        rb_log(RB_LOG_ERROR, "%s: dispatcher failed (cid %s): %s", f->name, sc->correlation_id,
               status ? lua_tostring(t->co, -1) : "no reply body");
    }
    rb_log(RB_LOG_DEBUG, "%s: served cid %s in %llu ms", f->name, sc->correlation_id,
           (unsigned long long)(rb_now_ms() - sc->started_ms));
    if (rb_link_is_open(s->link) && sc->epoch == s->epoch) rb_link_ack(s->link, f->channel, sc->delivery_tag);
    f->inflight--;
    s->inflight--;
    free(sc);
    if (s->closing && s->inflight == 0) server_free(s);
}

static void on_delivery(rb_link *link, void *data, const rb_message *m) {
    func *f = data;
    server *s = f->srv;
    if (!m->has_reply_to || !*m->reply_to) {
        rb_log(RB_LOG_WARN, "%s: dropped a request without reply_to (cid '%s')", f->name, m->correlation_id);
        rb_link_ack(link, m->channel, m->delivery_tag);
        return;
    }
    if (m->deadline_ms && rb_epoch_ms() > m->deadline_ms) {
        rb_log(RB_LOG_INFO, "%s: skipped cid %s: its caller gave up %lld ms ago", f->name, m->correlation_id,
               (long long)(rb_epoch_ms() - m->deadline_ms));
        rb_link_ack(link, m->channel, m->delivery_tag);
        return;
    }
    server_call *sc = malloc(sizeof *sc);
    if (!sc || rb_link_track_delivery(link, m->channel, m->delivery_tag) < 0) {
        free(sc);
        rb_log(RB_LOG_ERROR, "%s: out of memory; request left to the broker", f->name);
        return;
    }
    sc->f = f;
    sc->epoch = s->epoch;
    sc->delivery_tag = m->delivery_tag;
    sc->started_ms = rb_now_ms();
    sc->has_correlation_id = m->has_correlation_id;
    /* memcpy, not snprintf: this is per call, and the link already bounded
     * both strings to 255 bytes. */
    memcpy(sc->reply_to, m->reply_to, strlen(m->reply_to) + 1);
    memcpy(sc->correlation_id, m->correlation_id, strlen(m->correlation_id) + 1);

    if (!m->has_correlation_id)
        rb_log(RB_LOG_WARN, "%s: a request without correlation_id: its reply carries none", f->name);
    lua_State *L = rb_proc.L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, f->dispatch_ref);
    const char *err = NULL;
    if (m->body_len > s->max_body) {
        lua_pushnil(L);
        lua_pushfstring(L, "request body of %d bytes exceeds max_body (%d)", (int)m->body_len,
                        (int)s->max_body);
        rb_log(RB_LOG_WARN, "%s: refused cid %s: %s", f->name, sc->correlation_id, lua_tostring(L, -1));
    } else if (rb_body_is_compressed(m->body, m->body_len)) {
        if (rb_body_decompress(m->body, m->body_len, s->max_body, &s->scratch, &err) == 0) {
            lua_pushlstring(L, s->scratch.data, s->scratch.len);
            lua_pushnil(L);
        } else {
            lua_pushnil(L);
            lua_pushfstring(L, "cannot decompress the request: %s", err);
            rb_log(RB_LOG_WARN, "%s: refused cid %s: %s", f->name, sc->correlation_id, lua_tostring(L, -1));
        }
    } else {
        lua_pushlstring(L, m->body, m->body_len);
        lua_pushnil(L);
    }
    lua_pushstring(L, sc->correlation_id);
    f->inflight++;
    s->inflight++;
    rb_task *t = rb_task_spawn(L, 3, call_done, sc);
    if (t) {
        rb_task_release(t);
    } else {
        f->inflight--;
        s->inflight--;
        rb_link_ack(link, m->channel, m->delivery_tag);
        free(sc);
        rb_log(RB_LOG_ERROR, "%s: out of memory starting a call", f->name);
    }
}

static void on_closed(rb_link *link, void *data, const char *why, int channel_open) {
    (void)link;
    func *f = data;
    f->consuming = 0;
    f->channel_open = channel_open;
    rb_log(RB_LOG_ERROR, "%s: stopped serving: %s; declaring it again in 1 s", f->name, why);
    rb_timer_start(rb_get_loop(), &f->redeclare_timer, 1.0);
}

static void on_lost(rb_link *link, void *data, const char *why) {
    (void)link;
    (void)data;
    (void)why;
    /* core.run() returns "lost" and the worker reconnects: unacked requests
     * go back to their queues meanwhile and are served again. */
    if (!rb_proc.stopping) rb_proc.stopping = 2;
}

static const rb_channel_handler func_handler = {on_delivery, NULL, NULL, on_closed};

/* ---- Lua API ---- */

static server *check_server(lua_State *L) {
    server **sp = luaL_checkudata(L, 1, SERVER_MT);
    if (!*sp) luaL_argerror(L, 1, "server already closed");
    return *sp;
}

static int push_error(lua_State *L, const char *msg) {
    lua_pushnil(L);
    lua_pushstring(L, msg);
    return 2;
}

/* Opens the link and declares the exchange. 0, or -1 with err set. */
static int server_connect(server *s, char *err, size_t errlen) {
    rb_link_options opts = {s->url, s->heartbeat, s->connect_timeout, s->name, &s->tls};
    s->link = rb_link_open(&opts, err, errlen);
    if (!s->link) return -1;
    static const rb_channel_handler control = {NULL, NULL, NULL, NULL};
    if (rb_link_channel_open(s->link, CONTROL_CHANNEL, &control, s, err, errlen) < 0) return -1;
    amqp_exchange_declare(rb_link_conn(s->link), CONTROL_CHANNEL, amqp_cstring_bytes(RPC_EXCHANGE),
                          amqp_cstring_bytes("direct"), 0, 1, 0, 0, amqp_empty_table);
    if (rb_link_check_reply(s->link, CONTROL_CHANNEL, "exchange.declare rpc", err, errlen) < 0) return -1;
    rb_link_on_lost(s->link, on_lost, s);
    rb_link_set_max_body(s->link, s->max_body);
    return 0;
}

/* core.server_open(url, { heartbeat=, connect_timeout=, compress_threshold=, max_body=, name= }) */
static int api_server_open(lua_State *L) {
    const char *url = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_getfield(L, 2, "heartbeat");
    lua_getfield(L, 2, "connect_timeout");
    lua_getfield(L, 2, "compress_threshold");
    lua_getfield(L, 2, "max_body");
    lua_getfield(L, 2, "name");
    lua_getfield(L, 2, "tls");
    luaL_argcheck(L, strlen(url) < 1024, 1, "URL longer than 1023 bytes");
    rb_tls_options tls;
    rb_tls_options_from_lua(L, 8, &tls);
    server *s = calloc(1, sizeof *s);
    if (!s) return luaL_error(L, "out of memory");
    s->tls = tls;
    snprintf(s->url, sizeof s->url, "%s", url);
    snprintf(s->name, sizeof s->name, "%s", luaL_optstring(L, 7, "rabihost worker"));
    s->heartbeat = (int)luaL_optinteger(L, 3, 60);
    s->connect_timeout = luaL_optnumber(L, 4, 10);
    s->compress_threshold = (size_t)luaL_optnumber(L, 5, 1024);
    s->max_body = (size_t)luaL_optnumber(L, 6, 64.0 * 1024 * 1024);
    char err[600];
    if (server_connect(s, err, sizeof err) < 0) {
        rb_link_close(s->link);
        free(s);
        return push_error(L, err);
    }
    server **sp = lua_newuserdata(L, sizeof *sp);
    *sp = s;
    luaL_getmetatable(L, SERVER_MT);
    lua_setmetatable(L, -2);
    return 1;
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

static int declare_queue(server *s, func *f, char *err, size_t errlen) {
    amqp_table_entry_t args[3];
    int nargs = 0;
    args[nargs].key = amqp_cstring_bytes("x-overflow");
    args[nargs].value.kind = AMQP_FIELD_KIND_UTF8;
    args[nargs++].value.value.bytes = amqp_cstring_bytes("reject-publish");
    if (f->ttl_ms > 0) {
        args[nargs].key = amqp_cstring_bytes("x-message-ttl");
        args[nargs++].value = int_value(f->ttl_ms);
    }
    if (f->queue_size > 0) {
        args[nargs].key = amqp_cstring_bytes("x-max-length");
        args[nargs++].value = int_value(f->queue_size);
    }
    amqp_table_t table = {nargs, args};
    amqp_queue_declare(rb_link_conn(s->link), f->channel, amqp_cstring_bytes(f->queue), 0, 1, 0,
                       f->auto_delete, table);
    return rb_link_check_reply(s->link, f->channel, "queue.declare", err, errlen);
}

/* Declares, binds and consumes one function's queue on its own channel.
 * With re_register, a queue declared earlier with other arguments is
 * deleted and declared again; only then, so that re-registering the same
 * arguments never takes a queue (and its waiting calls) from a sibling. */
static int func_declare(server *s, func *f, int re_register, char *err, size_t errlen) {
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
    amqp_queue_bind(conn, f->channel, amqp_cstring_bytes(f->queue), amqp_cstring_bytes(RPC_EXCHANGE),
                    amqp_cstring_bytes(f->routing_key), amqp_empty_table);
    if (rb_link_check_reply(s->link, f->channel, "queue.bind", err, errlen) < 0) goto closed;
    amqp_basic_qos(conn, f->channel, 0, (uint16_t)f->fetch_size, 0);
    if (rb_link_check_reply(s->link, f->channel, "basic.qos", err, errlen) < 0) goto closed;
    amqp_basic_consume_ok_t *ok = amqp_basic_consume(conn, f->channel, amqp_cstring_bytes(f->queue),
                                                     amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    if (rb_link_check_reply(s->link, f->channel, "basic.consume", err, errlen) < 0) goto closed;
    snprintf(f->consumer_tag, sizeof f->consumer_tag, "%.*s", (int)ok->consumer_tag.len,
             (char *)ok->consumer_tag.bytes);
    f->consuming = 1;
    return 0;
closed:
    f->channel_open = 0;
    return -1;
}

static void on_redeclare_tick(rb_loop *loop, void *data) {
    (void)loop;
    func *f = data;
    server *s = f->srv;
    if (f->consuming || !rb_link_is_open(s->link) || rb_proc.stopping) return;
    char err[600];
    if (func_declare(s, f, 0, err, sizeof err) == 0)
        rb_log(RB_LOG_INFO, "%s: serving again", f->name);
    else
        rb_log(RB_LOG_ERROR, "%s: %s", f->name, err);
}

static double opt_positive(lua_State *L, int idx) {
    return lua_isnil(L, idx) ? 0 : luaL_checknumber(L, idx);
}

/* srv:serve{ name=, queue=, routing_key=, queue_size=, ttl_ms=, fetch_size=,
 *            re_register=, dispatch=function(body, decode_error, cid) } -> true | nil, err */
static int api_serve(lua_State *L) {
    server *s = check_server(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_getfield(L, 2, "name");
    lua_getfield(L, 2, "queue");
    lua_getfield(L, 2, "routing_key");
    lua_getfield(L, 2, "fetch_size");
    lua_getfield(L, 2, "re_register");
    lua_getfield(L, 2, "dispatch");
    lua_getfield(L, 2, "queue_size");
    lua_getfield(L, 2, "ttl_ms");
    const char *name = luaL_checkstring(L, 3);
    const char *queue = luaL_checkstring(L, 4);
    const char *rk = luaL_checkstring(L, 5);
    int fetch = (int)luaL_optinteger(L, 6, 0);
    int re_register = lua_toboolean(L, 7);
    luaL_checktype(L, 8, LUA_TFUNCTION);
    luaL_argcheck(L, strlen(queue) < 256 && strlen(name) < 256 && strlen(rk) < 256, 2,
                  "name longer than 255 bytes");
    if (fetch < 0 || fetch > 65535) return push_error(L, "fetch_size must be between 0 and 65535");
    if (!rb_link_is_open(s->link)) return push_error(L, rb_link_error(s->link));
    func **grown = realloc(s->funcs, (size_t)(s->nfuncs + 1) * sizeof *grown);
    func *f = calloc(1, sizeof *f);
    if (!grown || !f) {
        free(f);
        if (grown) s->funcs = grown;
        return luaL_error(L, "out of memory");
    }
    s->funcs = grown;
    f->srv = s;
    f->channel = (amqp_channel_t)(CONTROL_CHANNEL + 1 + s->nfuncs);
    snprintf(f->name, sizeof f->name, "%s", name);
    snprintf(f->queue, sizeof f->queue, "%s", queue);
    snprintf(f->routing_key, sizeof f->routing_key, "%s", rk);
    f->fetch_size = fetch;
    f->queue_size = opt_positive(L, 9);
    f->ttl_ms = opt_positive(L, 10);
    lua_getfield(L, 2, "auto_delete");
    f->auto_delete = lua_isnil(L, -1) ? 1 : lua_toboolean(L, -1);
    lua_pop(L, 1);
    rb_timer_init(&f->redeclare_timer, on_redeclare_tick, f);
    lua_pushvalue(L, 8);
    f->dispatch_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    s->funcs[s->nfuncs++] = f;
    char err[600];
    if (func_declare(s, f, re_register, err, sizeof err) < 0) return push_error(L, err);
    lua_pushboolean(L, 1);
    return 1;
}

/* srv:reconnect() -> true | nil, err: a new link, every function declared
 * and consumed again. Calls in flight finish; their requests, unacked on the
 * old link, come back from the broker and are served again. */
static int api_reconnect(lua_State *L) {
    server *s = check_server(L);
    rb_link_close(s->link);
    s->link = NULL;
    s->epoch++;
    char err[600];
    if (server_connect(s, err, sizeof err) < 0) {
        rb_link_close(s->link);
        s->link = NULL;
        return push_error(L, err);
    }
    for (int i = 0; i < s->nfuncs; i++) {
        func *f = s->funcs[i];
        f->channel_open = 0; /* channels died with the old link */
        if (func_declare(s, f, 0, err, sizeof err) < 0) rb_log(RB_LOG_ERROR, "%s: %s", f->name, err);
    }
    if (!rb_link_is_open(s->link)) return push_error(L, rb_link_error(s->link));
    lua_pushboolean(L, 1);
    return 1;
}

static void cancel_consumer(server *s, func *f) {
    amqp_basic_cancel(rb_link_conn(s->link), f->channel, amqp_cstring_bytes(f->consumer_tag));
    char err[600];
    if (rb_link_check_reply(s->link, f->channel, "basic.cancel", err, sizeof err) < 0)
        rb_log(RB_LOG_WARN, "%s: %s", f->name, err);
    f->consuming = 0;
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
        return -1;
    }
    *consumers = ok->consumer_count;
    *ready = ok->message_count;
    return 0;
}

/* srv:cancel([force]) -> functions still held: stop taking new requests;
 * calls in flight go on. An auto-delete queue whose only consumer is this
 * worker would be deleted with the calls waiting in it, so that consumer
 * is held until the queue is empty (srv:cancel again), unless forced. */
static int api_cancel(lua_State *L) {
    server *s = check_server(L);
    int force = lua_toboolean(L, 2);
    int held = 0;
    for (int i = 0; i < s->nfuncs; i++) {
        func *f = s->funcs[i];
        if (!f->consuming || !rb_link_is_open(s->link)) continue;
        uint32_t consumers = 0, ready = 0;
        if (!force && f->auto_delete && queue_counts(s, f, &consumers, &ready) == 0 && consumers <= 1 &&
            (ready > 0 || f->inflight > 0)) {
            held++;
            continue;
        }
        if (f->consuming) cancel_consumer(s, f);
    }
    lua_pushinteger(L, held);
    return 1;
}

static int api_inflight(lua_State *L) {
    server *s = check_server(L);
    lua_pushinteger(L, (lua_Integer)s->inflight);
    return 1;
}

static int api_is_open(lua_State *L) {
    server *s = check_server(L);
    lua_pushboolean(L, rb_link_is_open(s->link));
    return 1;
}

static void server_free(server *s) {
    for (int i = 0; i < s->nfuncs; i++) {
        rb_timer_stop(rb_get_loop(), &s->funcs[i]->redeclare_timer);
        luaL_unref(rb_proc.L, LUA_REGISTRYINDEX, s->funcs[i]->dispatch_ref);
        free(s->funcs[i]);
    }
    free(s->funcs);
    rb_buf_free(&s->scratch);
    free(s);
}

static int api_server_close(lua_State *L) {
    server **sp = luaL_checkudata(L, 1, SERVER_MT);
    server *s = *sp;
    if (!s) return 0;
    *sp = NULL;
    rb_link_close(s->link);
    s->link = NULL;
    if (s->inflight > 0)
        s->closing = 1;
    else
        server_free(s);
    return 0;
}

void rb_open_server(lua_State *L) {
    static const luaL_Reg methods[] = {{"serve", api_serve},
                                       {"cancel", api_cancel},
                                       {"reconnect", api_reconnect},
                                       {"inflight", api_inflight},
                                       {"is_open", api_is_open},
                                       {"close", api_server_close},
                                       {NULL, NULL}};
    rb_register_class(L, SERVER_MT, methods, api_server_close);
    lua_pushcfunction(L, api_server_open);
    lua_setfield(L, -2, "server_open");
}

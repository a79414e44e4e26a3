/* The gateway's server in Lua (see gateway.h). One owner per piece: the
 * userdata owns the rb_gateway while Lua holds it; each request in flight
 * holds a reference too, so that a server closed (or collected) with
 * requests under way is freed by the last of them. */
#include "gateway.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bind.h"
#include "http.h"
#include "log.h"
#include "task.h"

struct rb_gateway {
    rb_http *http;
    rb_sched *sched;
    int handler_ref;
    long inflight, max_inflight;
    double deadline; /* seconds a request's task may run before its waits are cancelled */
    int refs;        /* the userdata's + one per request in flight */
};

typedef struct {
    rb_gateway *g;
    rb_http_request *req;
} gw_request;

static void gateway_unref(rb_gateway *g) {
    if (--g->refs > 0) return;
    free(g);
}

static void reply_json(rb_http_request *req, int status, const char *json, const char *const *headers) {
    size_t len;
    char *body = rb_http_text(json, &len);
    rb_http_reply(req, status, "application/json", body, body ? len : 0, headers);
}

/* s for a log line in buf: control characters, backslash and bytes >=
 * 0x80 (a client's path may hold any) written \xHH; cut short to fit. */
static const char *printable(const char *s, char *buf, size_t size) {
    static const char hex[] = "0123456789ABCDEF";
    size_t n = 0;
    for (; *s && n + 5 < size; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c == 0x7f || c == '\\' || c >= 0x80) {
            buf[n++] = '\\';
            buf[n++] = 'x';
            buf[n++] = hex[c >> 4];
            buf[n++] = hex[c & 15];
        } else {
            buf[n++] = (char)c;
        }
    }
    buf[n] = '\0';
    return buf;
}

/* The handler's results on co: status, body (string), headers (table or
 * nil). Header names and values stay on co's stack while they are copied. */
static void reply_from_task(rb_http_request *req, lua_State *co) {
    int top = lua_gettop(co);
    int status = top >= 3 ? (int)lua_tointeger(co, top - 2) : 0;
    size_t len = 0;
    const char *text = top >= 3 ? lua_tolstring(co, top - 1, &len) : NULL;
    if (status < 200 || status > 599 || !text) { /* 1xx: no answer; the client would wait for one */
        char path[256];
        rb_log(RB_LOG_ERROR, "http: %s %s: the handler gave no final status (%d) and body",
               rb_http_request_method(req), printable(rb_http_request_path(req), path, sizeof path), status);
        reply_json(req, 500, "{\"kind\":\"internal\",\"message\":\"the handler gave no status and body\"}\n",
                   NULL);
        return;
    }
    const char *headers[2 * 16 + 1];
    int n = 0;
    const char *type = "application/json";
    if (lua_istable(co, top)) {
        lua_pushnil(co);
        while (lua_next(co, top) != 0) {
            if (lua_type(co, -2) == LUA_TSTRING && lua_type(co, -1) == LUA_TSTRING) {
                const char *k = lua_tostring(co, -2), *v = lua_tostring(co, -1);
                if (strcasecmp(k, "content-type") == 0)
                    type = v;
                else if (n < 2 * 16) {
                    headers[n++] = k;
                    headers[n++] = v;
                }
            }
            lua_pop(co, 1); /* the table keeps the strings alive */
        }
    }
    headers[n] = NULL;
    char *body = malloc(len ? len : 1);
    if (!body) {
        rb_http_reply(req, 500, "application/json", NULL, 0, NULL);
        return;
    }
    memcpy(body, text, len);
    rb_http_reply(req, status, type, body, len, headers);
}

static void request_done(rb_task *t, int status, void *data) {
    gw_request *r = data;
    lua_State *co = rb_task_thread(t);
    if (status == 0) {
        reply_from_task(r->req, co);
    } else {
        char path[256];
        rb_log(RB_LOG_ERROR, "http: %s %s: the handler raised: %s", rb_http_request_method(r->req),
               printable(rb_http_request_path(r->req), path, sizeof path),
               lua_tostring(co, -1) ? lua_tostring(co, -1) : "(not a string)");
        reply_json(r->req, 500, "{\"kind\":\"internal\",\"message\":\"the request's handler failed\"}\n",
                   NULL);
    }
    r->g->inflight--;
    gateway_unref(r->g);
    free(r);
}

/* Header names in lower case: HTTP's are case-insensitive, Lua's keys not. */
static void set_lower(void *cls, const char *key, const char *value) {
    lua_State *L = cls;
    char name[256];
    size_t i = 0;
    for (; i < sizeof name - 1 && key[i]; i++)
        name[i] = (char)(key[i] >= 'A' && key[i] <= 'Z' ? key[i] - 'A' + 'a' : key[i]);
    name[i] = '\0';
    lua_pushstring(L, value);
    lua_setfield(L, -2, name);
}

static void set_raw(void *cls, const char *key, const char *value) {
    lua_State *L = cls;
    lua_pushstring(L, value);
    lua_setfield(L, -2, key);
}

static void push_request(lua_State *L, rb_http_request *req) {
    lua_createtable(L, 0, 5);
    lua_pushstring(L, rb_http_request_method(req));
    lua_setfield(L, -2, "method");
    lua_pushstring(L, rb_http_request_path(req));
    lua_setfield(L, -2, "path");
    lua_newtable(L);
    rb_http_request_each(req, 0, set_raw, L);
    lua_setfield(L, -2, "query");
    lua_newtable(L);
    rb_http_request_each(req, 1, set_lower, L);
    lua_setfield(L, -2, "headers");
    size_t len;
    const char *body = rb_http_request_body(req, &len);
    lua_pushlstring(L, body, len);
    lua_setfield(L, -2, "body");
}

static void on_request(void *data, rb_http_request *req) {
    rb_gateway *g = data;
    if (g->inflight >= g->max_inflight) {
        static const char *const retry[] = {"Retry-After", "1", NULL};
        reply_json(req, 503,
                   "{\"kind\":\"overloaded\",\"message\":\"too many requests in flight; retry later\"}\n",
                   retry);
        return;
    }
    gw_request *r = malloc(sizeof *r);
    if (!r) {
        reply_json(req, 500, "{\"kind\":\"internal\",\"message\":\"out of memory\"}\n", NULL);
        return;
    }
    r->g = g;
    r->req = req;
    g->inflight++;
    g->refs++;
    lua_State *L = rb_sched_state(g->sched);
    lua_rawgeti(L, LUA_REGISTRYINDEX, g->handler_ref);
    push_request(L, req);
    rb_task_opts opts = {request_done, r, rb_now_s() + g->deadline, NULL, NULL, NULL};
    rb_task *t = rb_task_spawn(g->sched, L, 1, &opts);
    if (t) {
        rb_task_release(t); /* r is the task's now: request_done frees it */
    } else {
        g->inflight--;
        gateway_unref(g);
        free(r);
        reply_json(req, 500, "{\"kind\":\"internal\",\"message\":\"out of memory\"}\n", NULL);
    }
}

/* ---- Lua API ---- */

int rb_api_http_listen_socket(lua_State *L) {
    const char *listen = luaL_checkstring(L, 1);
    char err[300];
    int port;
    int fd = rb_http_listen_socket(listen, &port, err, sizeof err);
    if (fd < 0) return rb_fail(L, "io", "%s", err);
    lua_pushinteger(L, fd);
    lua_pushinteger(L, port);
    return 2;
}

static size_t opt_size(lua_State *L, const char *key, double lo, double dflt) {
    double v = rb_opt_number(L, 1, "http_serve", key, dflt);
    if (!(v >= lo) || v > 1e15) rb_opt_error(L, "http_serve", key, "out of range");
    return (size_t)v;
}

/* core.http_serve({ listen = "HOST:PORT" | fd = n, max_connections =,
 * client_timeout = s, header_limit = bytes, max_body = bytes, max_inflight =,
 * deadline = s, tls_cert = PEM, tls_key = PEM, token = bearer token }, handler) -> gateway | nil, err.
 * handler(req) runs as a task per request and returns status, body, headers. */
int rb_api_http_serve(lua_State *L) {
    rb_check_options(L, 1, "http_serve");
    luaL_checktype(L, 2, LUA_TFUNCTION);
    rb_http_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.listen = rb_opt_string(L, 1, "http_serve", "listen", NULL);
    cfg.fd = rb_opt_int(L, 1, "http_serve", "fd", -1, 1 << 30, -1);
    if (!cfg.listen && cfg.fd < 0) return rb_opt_error(L, "http_serve", "listen", "HOST:PORT or fd needed");
    cfg.max_connections = (unsigned)opt_size(L, "max_connections", 1, 1024);
    cfg.connection_timeout = (unsigned)opt_size(L, "client_timeout", 0, 10);
    cfg.memory_limit = opt_size(L, "header_limit", 4096, 32 * 1024);
    cfg.max_body = opt_size(L, "max_body", 0, 1024 * 1024);
    cfg.tls_cert = rb_opt_string(L, 1, "http_serve", "tls_cert", NULL);
    cfg.tls_key = rb_opt_string(L, 1, "http_serve", "tls_key", NULL);
    cfg.token = rb_opt_string(L, 1, "http_serve", "token", NULL);
    if (!cfg.tls_cert != !cfg.tls_key)
        return rb_opt_error(L, "http_serve", cfg.tls_cert ? "tls_key" : "tls_cert",
                            "TLS needs both cert and key");
    long max_inflight = (long)opt_size(L, "max_inflight", 1, 1024);
    double deadline = rb_opt_number(L, 1, "http_serve", "deadline", 60);
    if (!(deadline > 0)) return rb_opt_error(L, "http_serve", "deadline", "a number of seconds > 0 expected");
    rb_gateway *g = calloc(1, sizeof *g);
    if (!g) return rb_fail(L, "io", "out of memory");
    g->sched = rb_sched_of(L);
    g->max_inflight = max_inflight;
    g->deadline = deadline;
    g->refs = 1;
    char err[300];
    g->http = rb_http_serve(rb_sched_loop(g->sched), &cfg, on_request, g, err, sizeof err);
    if (!g->http) {
        free(g);
        return rb_fail(L, "io", "%s", err);
    }
    lua_pushvalue(L, 2);
    g->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    rb_gateway **ud = lua_newuserdata(L, sizeof *ud);
    *ud = g;
    luaL_getmetatable(L, RB_GATEWAY_CLASS);
    lua_setmetatable(L, -2);
    return 1;
}

rb_gateway *rb_gateway_check(lua_State *L, int idx) {
    rb_gateway **ud = luaL_checkudata(L, idx, RB_GATEWAY_CLASS);
    if (!*ud) luaL_error(L, "the HTTP server is closed");
    return *ud;
}

long rb_gateway_inflight(const rb_gateway *g) {
    return g->inflight + (g->http ? rb_http_answering(g->http) : 0);
}

void rb_gateway_quiesce(rb_gateway *g) {
    rb_http_quiesce(g->http);
}

static int api_port(lua_State *L) {
    lua_pushinteger(L, rb_http_port(rb_gateway_check(L, 1)->http));
    return 1;
}

static int api_inflight(lua_State *L) {
    lua_pushinteger(L, rb_gateway_check(L, 1)->inflight);
    return 1;
}

/* Closes the server: requests still running are dropped unanswered when
 * their handlers end (their connections close now). */
int rb_api_gateway_gc(lua_State *L) {
    rb_gateway **ud = luaL_checkudata(L, 1, RB_GATEWAY_CLASS);
    rb_gateway *g = *ud;
    if (!g) return 0;
    *ud = NULL;
    rb_http_close(g->http);
    g->http = NULL;
    luaL_unref(L, LUA_REGISTRYINDEX, g->handler_ref);
    g->handler_ref = LUA_NOREF;
    gateway_unref(g);
    return 0;
}

const luaL_Reg rb_gateway_methods[] = {
    {"port", api_port}, {"inflight", api_inflight}, {"close", rb_api_gateway_gc}, {NULL, NULL}};

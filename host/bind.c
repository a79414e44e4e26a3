/* Helpers shared by the Lua bindings: the error shape and option checks. */
#include "bind.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "link.h"

void rb_new_error(lua_State *L, const char *kind, const char *message) {
    lua_createtable(L, 0, 2);
    lua_pushstring(L, kind);
    lua_setfield(L, -2, "kind");
    lua_pushstring(L, message);
    lua_setfield(L, -2, "message");
    luaL_getmetatable(L, RB_ERROR_MT);
    lua_setmetatable(L, -2);
}

int rb_fail(lua_State *L, const char *kind, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    lua_pushnil(L);
    rb_new_error(L, kind, msg);
    return 2;
}

int rb_opt_error(lua_State *L, const char *fname, const char *key, const char *what) {
    return luaL_error(L, "%s: option '%s': %s", fname, key, what);
}

static int type_error(lua_State *L, const char *fname, const char *key, const char *expected) {
    char what[96];
    snprintf(what, sizeof what, "%s expected, got %s", expected, luaL_typename(L, -1));
    return rb_opt_error(L, fname, key, what);
}

void rb_check_options(lua_State *L, int idx, const char *fname) {
    if (!lua_isnoneornil(L, idx) && !lua_istable(L, idx))
        luaL_error(L, "%s: options must be a table, got %s", fname, luaL_typename(L, idx));
}

/* Pushes options[key], or nil when there is no options table. A key of a
 * nested table is named with its parent ("tls.verify_peer"), so that its
 * errors say where it sits; it is looked up by its last part. */
static void get_field(lua_State *L, int idx, const char *key) {
    const char *dot = strrchr(key, '.');
    if (lua_istable(L, idx))
        lua_getfield(L, idx, dot ? dot + 1 : key);
    else
        lua_pushnil(L);
}

double rb_opt_number(lua_State *L, int idx, const char *fname, const char *key, double dflt) {
    get_field(L, idx, key);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return dflt;
    }
    if (lua_type(L, -1) != LUA_TNUMBER) type_error(L, fname, key, "number");
    double v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return v;
}

int rb_opt_int(lua_State *L, int idx, const char *fname, const char *key, int lo, int hi, int dflt) {
    double v = rb_opt_number(L, idx, fname, key, dflt);
    if (!(v >= lo && v <= hi) || v != (double)(int)v) {
        char what[96];
        snprintf(what, sizeof what, "an integer from %d to %d expected, got %g", lo, hi, v);
        rb_opt_error(L, fname, key, what);
    }
    return (int)v;
}

int rb_opt_bool(lua_State *L, int idx, const char *fname, const char *key, int dflt) {
    get_field(L, idx, key);
    int v = dflt;
    if (lua_isboolean(L, -1))
        v = lua_toboolean(L, -1);
    else if (!lua_isnil(L, -1))
        type_error(L, fname, key, "boolean");
    lua_pop(L, 1);
    return v;
}

const char *rb_opt_string(lua_State *L, int idx, const char *fname, const char *key, const char *dflt) {
    get_field(L, idx, key);
    const char *v = dflt;
    if (lua_type(L, -1) == LUA_TSTRING)
        v = lua_tostring(L, -1);
    else if (!lua_isnil(L, -1))
        type_error(L, fname, key, "string");
    lua_pop(L, 1); /* the table still anchors the string */
    return v;
}

void rb_opt_body_limits(lua_State *L, int idx, const char *fname, size_t *threshold, size_t *max_body) {
    double t = rb_opt_number(L, idx, fname, "compress_threshold", 1024);
    double m = rb_opt_number(L, idx, fname, "max_body", 64.0 * 1024 * 1024);
    if (!(t >= 0)) rb_opt_error(L, fname, "compress_threshold", "must not be negative");
    if (!(m >= 1)) rb_opt_error(L, fname, "max_body", "must be at least 1");
    *threshold = (size_t)t;
    *max_body = (size_t)m;
}

void rb_opt_table(lua_State *L, int idx, const char *fname, const char *key) {
    get_field(L, idx, key);
    if (!lua_isnil(L, -1) && !lua_istable(L, -1)) type_error(L, fname, key, "table");
}

void rb_register_class(lua_State *L, rb_sched *s, const char *name, const luaL_Reg *methods,
                       lua_CFunction gc) {
    if (luaL_newmetatable(L, name)) {
        lua_newtable(L);
        lua_pushlightuserdata(L, s);
        luaL_openlib(L, NULL, methods, 1);
        lua_setfield(L, -2, "__index");
        lua_pushlightuserdata(L, s);
        lua_pushcclosure(L, gc, 1);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
}

static void copy_path(lua_State *L, int idx, const char *fname, const char *key, char *dst, size_t cap) {
    const char *v = rb_opt_string(L, idx, fname, key, "");
    if (strlen(v) >= cap) {
        char what[64];
        snprintf(what, sizeof what, "path longer than %d bytes", (int)cap - 1);
        rb_opt_error(L, fname, key, what);
    }
    snprintf(dst, cap, "%s", v);
}

void rb_opt_tls(lua_State *L, int idx, const char *fname, rb_tls_options *out) {
    memset(out, 0, sizeof *out);
    out->verify_peer = out->verify_hostname = 1;
    rb_opt_table(L, idx, fname, "tls");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return;
    }
    int t = lua_gettop(L);
    copy_path(L, t, fname, "tls.ca_cert", out->ca_cert, sizeof out->ca_cert);
    copy_path(L, t, fname, "tls.cert", out->cert, sizeof out->cert);
    copy_path(L, t, fname, "tls.key", out->key, sizeof out->key);
    out->verify_peer = rb_opt_bool(L, t, fname, "tls.verify_peer", 1);
    out->verify_hostname = rb_opt_bool(L, t, fname, "tls.verify_hostname", 1);
    lua_pop(L, 1);
}

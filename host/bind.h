/* What every Lua binding of rabibridge.core shares: finding the scheduler
 * (and through it the loop) from the Lua state, the one shape of an I/O
 * failure, options checked by name, and userdata classes.
 *
 * The convention, after luv: misuse raises, with a message that names the
 * function and the option ("client: option 'heartbeat': number expected,
 * got string"); an I/O failure returns nil and an error value, a table
 * { kind =, message = } whose metatable lua/rabibridge/errors.lua fills. */
#ifndef RB_BIND_H
#define RB_BIND_H

#include "lauxlib.h"
#include "lua.h"
#include "task.h"

#define RB_ERROR_MT "rabibridge.error"

/* Every function of the module, methods included, carries the scheduler as
 * its first upvalue (core.c registers them so). */
#define rb_sched_of(L) ((rb_sched *)lua_touserdata((L), lua_upvalueindex(1)))

/* Pushes an error value { kind, message }. */
void rb_new_error(lua_State *L, const char *kind, const char *message);
/* Pushes nil and an error value; returns 2, for `return rb_fail(...)`. */
int rb_fail(lua_State *L, const char *kind, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Options tables. fname names the caller in messages. A missing table
 * (nil or none) reads as empty; another type raises. */
void rb_check_options(lua_State *L, int idx, const char *fname);
double rb_opt_number(lua_State *L, int idx, const char *fname, const char *key, double dflt);
int rb_opt_int(lua_State *L, int idx, const char *fname, const char *key, int lo, int hi, int dflt);
int rb_opt_bool(lua_State *L, int idx, const char *fname, const char *key, int dflt);
/* The string stays valid while the options table does. */
const char *rb_opt_string(lua_State *L, int idx, const char *fname, const char *key, const char *dflt);
/* Pushes the field if it is a table (or nil when absent); raises otherwise. */
void rb_opt_table(lua_State *L, int idx, const char *fname, const char *key);
/* Reads compress_threshold (default 1024, not negative) and max_body
 * (default 64 MiB, at least 1): the body options clients and servers share. */
void rb_opt_body_limits(lua_State *L, int idx, const char *fname, size_t *threshold, size_t *max_body);
/* Raises "fname: option 'key': <what>". */
int rb_opt_error(lua_State *L, const char *fname, const char *key, const char *what);

struct rb_tls_options;
/* Reads options.tls, { ca_cert=, cert=, key=, verify_peer=, verify_hostname= }
 * (absent: defaults), into out; raises on a wrongly typed field. */
void rb_opt_tls(lua_State *L, int idx, const char *fname, struct rb_tls_options *out);

/* A userdata class: its metatable (methods as __index, and __gc), made
 * once, with the scheduler as every method's upvalue. */
void rb_register_class(lua_State *L, rb_sched *s, const char *name, const luaL_Reg *methods,
                       lua_CFunction gc);

#endif

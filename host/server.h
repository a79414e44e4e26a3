/* The serving side of a worker: the C API its lifecycle (worker.c) drives,
 * and the Lua API (core.server_open and the server's methods). */
#ifndef RB_SERVER_H
#define RB_SERVER_H

#include <stddef.h>

#include "lauxlib.h"

#define RB_SERVER_CLASS "rabibridge.server"

typedef struct rb_server rb_server;

rb_server *rb_server_check(lua_State *L, int idx);
long rb_server_inflight(const rb_server *s);
int rb_server_is_open(const rb_server *s);
/* A new link, every function declared and consumed again. Calls in flight
 * finish; their requests, unacked on the old link, come back from the
 * broker and are served again. The connection is made off the loop, and
 * done(data, NULL) or done(data, why) is called on the loop once it is
 * back or has failed. -1 with err set when it cannot even start (done is
 * then not called); 0 when one is under way already. */
int rb_server_reconnect_start(rb_server *s, void (*done)(void *data, const char *err), void *data, char *err,
                              size_t errlen);
/* Gives up a reconnection under way: its done is never called. */
void rb_server_reconnect_abandon(rb_server *s);
/* Stops taking new requests for good (a drain); calls in flight go on. An
 * auto-delete queue whose only consumer is this worker would be deleted
 * with the calls waiting in it, so that consumer is held until the queue is
 * empty (call again), unless forced. Returns how many are held. */
int rb_server_cancel(rb_server *s, int force);
/* Publishes a reply outside any call of this worker (the answer owed to the
 * caller of a call another worker stalled on). 0, or -1 when the link is
 * down. */
int rb_server_send_reply(rb_server *s, const char *reply_to, const char *cid, const void *body, size_t len);
/* Called once per lost connection, from the loop. */
void rb_server_on_lost(rb_server *s, void (*proc)(void *data, const char *why), void *data);

int rb_api_server_open(lua_State *L);
int rb_api_server_gc(lua_State *L);
extern const luaL_Reg rb_server_methods[];

#endif

/* Discovery: which functions a broker serves (rabihost list, rabi.discover).
 *
 * Plain AMQP cannot list queues, and RabbitMQ's management API needs a
 * plugin, an HTTP client and a user tagged for it. So the hosts answer for
 * themselves: each worker binds an exclusive, server-named queue to the rpc
 * exchange with the routing key RB_DISCOVERY_KEY, and answers whatever
 * arrives there with a description of its functions (JSON, made in Lua at
 * start). A direct exchange gives a copy to every queue bound with the key,
 * so every worker of every host answers one request; the asking side
 * gathers the answers for a short window and asks the broker for each
 * queue's counts. Function queues are bound with "async_NAME" or
 * "sync_NAME", ours and RabiBridge's alike, so no request ever reaches one,
 * and a Python peer never sees the key. */
#ifndef RB_DISCOVERY_H
#define RB_DISCOVERY_H

#include <stddef.h>

#include "lauxlib.h"
#include "link.h"

#define RB_DISCOVERY_CLASS "rabibridge.discovery"

/* ---- the answering side: one per server (server.c owns it) ---- */

typedef struct rb_discovery rb_discovery;

/* An answerer that replies with a copy of answer. NULL when out of memory. */
rb_discovery *rb_discovery_new(const char *answer, size_t len);
/* Declares its queue on the link's channel ch, binds and consumes it: after
 * every (re)connection. 0, or -1 with err set. */
int rb_discovery_attach(rb_discovery *d, rb_link *link, amqp_channel_t ch, char *err, size_t errlen);
/* Answers no more: a draining worker no longer serves what it would list. */
void rb_discovery_stop(rb_discovery *d);
void rb_discovery_free(rb_discovery *d);

/* ---- the asking side: the Lua API ---- */

/* core.discovery_open(url, { heartbeat=, connect_timeout=, max_body=, name=, tls= })
 * -> asker | nil, error */
int rb_api_discovery_open(lua_State *L);
int rb_api_discovery_gc(lua_State *L);
/* core.hostname() -> this machine's host name, for the answers. */
int rb_api_hostname(lua_State *L);
extern const luaL_Reg rb_discovery_methods[];

#endif

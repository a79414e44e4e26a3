/* The names RabiBridge's wire protocol fixes, in one place. A function NAME
 * of type FTYPE is served from the queue RB_QUEUE_PREFIX "FTYPE_NAME",
 * bound to RB_RPC_EXCHANGE with the routing key "FTYPE_NAME". The Lua
 * layer reads them from core.wire. */
#ifndef RB_WIRE_H
#define RB_WIRE_H

#define RB_RPC_EXCHANGE "rpc"
#define RB_RPC_EXCHANGE_TYPE "direct"
#define RB_QUEUE_PREFIX "rpc_"

/* The header a client sets when its call has a timeout, so that a server can
 * skip work whose caller has already given up (epoch milliseconds). */
#define RB_DEADLINE_HEADER "x-rabibridge-deadline-ms"

/* A reply that says a request was never run because it timed out (in its
 * queue, or before a worker took it) carries why in this header: a
 * rabihost client reports kind timeout with that text, where a Python
 * client sees the body, an ordinary error reply. */
#define RB_TIMEOUT_HEADER "x-rabibridge-timeout"

/* Where function queues dead-letter the requests that expire in them
 * (through the default exchange), for a host to answer them. */
#define RB_EXPIRED_QUEUE "rabihost.expired"

/* The routing key on RB_RPC_EXCHANGE that every rabihost worker listens on
 * to answer `rabihost list` (host/discovery.h). */
#define RB_DISCOVERY_KEY "rabihost.list"

/* W3C Trace Context's header (host/trace.h): every request carries one.
 * RabiBridge's Python peers ignore headers, so it costs them nothing. */
#define RB_TRACEPARENT_HEADER "traceparent"

#endif

/* A broker link: one AMQP connection driven by the event loop. rabbitmq-c
 * does the framing; this file turns its frames into whole messages, confirms
 * and closes, dispatched per channel, and batches acks before the loop sleeps. */
#ifndef RB_LINK_H
#define RB_LINK_H

#include <amqp.h>
#include <stdint.h>

#include "codec.h"
#include "loop.h"
#include "wire.h"

typedef struct rb_link rb_link;

typedef struct rb_message {
    amqp_channel_t channel;
    uint64_t delivery_tag;
    int redelivered;
    int reply_code;         /* basic.return only */
    const char *reply_text; /* basic.return only */
    const void *body;
    size_t body_len;
    const char *reply_to;       /* "" when absent */
    const char *correlation_id; /* "" when absent */
    const char *expiration;     /* "" when absent */
    int has_reply_to, has_correlation_id;
    int64_t deadline_ms;      /* the caller's deadline (epoch ms), 0 when none */
    const char *traceparent;  /* the W3C traceparent header as sent, "" when absent */
    const char *timeout_text; /* a reply's RB_TIMEOUT_HEADER; "" when absent */
    /* a dead-lettered message's first death: its queue and why ("" when none) */
    const char *death_queue, *death_reason;
    int64_t delivery_count; /* a quorum queue's x-delivery-count: earlier deliveries not acked */
} rb_message;

int64_t rb_epoch_ms(void);

typedef struct rb_channel_handler {
    void (*on_delivery)(rb_link *link, void *data, const rb_message *m);
    void (*on_return)(rb_link *link, void *data, const rb_message *m);
    void (*on_confirm)(rb_link *link, void *data, uint64_t tag, int multiple, int nack);
    /* The consumer or the channel is gone; channel_open says which. */
    void (*on_closed)(rb_link *link, void *data, const char *why, int channel_open);
} rb_channel_handler;

/* TLS for amqps:// URLs. Empty paths are unset; without a CA file the
 * system's trust store is used. Peer and host name checks default on. */
typedef struct rb_tls_options {
    char ca_cert[512], cert[512], key[512];
    int verify_peer, verify_hostname;
} rb_tls_options;

typedef struct rb_link_options {
    rb_loop *loop; /* the loop that drives the link */
    const char *url;
    int heartbeat;
    double connect_timeout;
    const char *connection_name;
    const rb_tls_options *tls; /* NULL: defaults */
    int first;                 /* the URL of the list tried first (wrapping round) */
} rb_link_options;

/* Opening without blocking the loop: the connect, the login and then
 * setup (when not NULL) run on a thread of their own, and done(data, link,
 * out, err) is called on opts->loop with the link, attached and open (and
 * out: what setup wrote), or with NULL and why. setup runs before the link
 * has a loop: it may make blocking calls (rb_link_channel_open and the
 * like) but must touch nothing else, and reports its result only through
 * out. NULL (err set) when the opening cannot start; done is then never
 * called. */
typedef struct rb_link_opening rb_link_opening;
typedef int rb_link_setup_fn(rb_link *link, char *out, size_t outlen, char *err, size_t errlen);
typedef void rb_link_opened_fn(void *data, rb_link *link, const char *out, const char *err);
rb_link_opening *rb_link_open_start(const rb_link_options *opts, rb_link_setup_fn *setup,
                                    rb_link_opened_fn *done, void *data, char *err, size_t errlen);
/* Gives up an opening whose done has not been called: it never will be,
 * and the link, when it comes, is closed. NULL does nothing. */
void rb_link_open_abandon(rb_link_opening *o);
/* How many URLs a space-separated list holds, and which of them a link is
 * connected to (0 for the first). */
int rb_link_url_count(const char *list);
int rb_link_url_index(const rb_link *link);
void rb_link_close(rb_link *link);
int rb_link_is_open(const rb_link *link);
/* Positions in the stream of bytes the link writes: how far the kernel has
 * taken it, and where what is gathered so far ends. A publish that ended
 * past rb_link_written when the link was lost never reached the broker
 * whole, so the broker never took it. */
uint64_t rb_link_written(const rb_link *link);
uint64_t rb_link_gathered_end(const rb_link *link);
/* How many deliveries the owner is waiting for (a client: its calls in
 * flight); many let the link batch its reads (link.c). */
void rb_link_expect_replies(rb_link *link, size_t n);
/* Bodies above max_body arrive with their size and no bytes. */
void rb_link_set_max_body(rb_link *link, size_t max_body);
/* Reads the socket first if the link has been quiet; 1 if still open. */
int rb_link_check_alive(rb_link *link);
amqp_connection_state_t rb_link_conn(rb_link *link);
/* The highest channel number the broker accepts on this link (its
 * channel_max, 2047 by default): opening one above makes it close the
 * connection. */
int rb_link_channel_max(const rb_link *link);

/* Called once when the connection is lost, with the reason. */
void rb_link_on_lost(rb_link *link, void (*proc)(rb_link *, void *, const char *), void *data);

/* Channel setup: blocking RPCs, used at start-up only. Each returns 0, or -1
 * with the broker's reason in err. */
int rb_link_channel_open(rb_link *link, amqp_channel_t ch, const rb_channel_handler *h, void *data, char *err,
                         size_t errlen);
/* Who a channel opened before its owner was known (by an opening's setup,
 * with NULL data) reports to. */
void rb_link_channel_bind(rb_link *link, amqp_channel_t ch, const rb_channel_handler *h, void *data);
int rb_link_check_reply(rb_link *link, amqp_channel_t ch, const char *what, char *err, size_t errlen);
/* The rpc exchange, declared on ch as every peer declares it (durable,
 * direct): then a publish to it is a clean return, never a NOT_FOUND
 * that closes the channel, even on a broker no server ever used. */
int rb_link_declare_rpc_exchange(rb_link *link, amqp_channel_t ch, char *err, size_t errlen);
/* A server-named exclusive queue declared on ch and consumed without
 * acks (replies, answers); its name to out. what names it in errors. */
int rb_link_consume_private_queue(rb_link *link, amqp_channel_t ch, const char *what, char *out,
                                  size_t outlen, char *err, size_t errlen);
/* Closes a channel without waiting for the broker's close-ok: what still
 * comes for it is dropped. Its number must not be opened again until that
 * close-ok has come. */
void rb_link_channel_close(rb_link *link, amqp_channel_t ch);
/* Drops a channel's state without a word to the broker (it closed the
 * channel, or the link is gone): nothing more is reported for it. */
void rb_link_channel_forget(rb_link *link, amqp_channel_t ch);

/* Acks go out in the before-sleep hook, merged with `multiple` where every
 * earlier delivery of the channel is done. track marks a delivery as owed an ack. */
int rb_link_track_delivery(rb_link *link, amqp_channel_t ch, uint64_t tag);
void rb_link_ack(rb_link *link, amqp_channel_t ch, uint64_t tag);
/* Hands an untracked delivery back to its queue at once (basic.reject). */
void rb_link_requeue(rb_link *link, amqp_channel_t ch, uint64_t tag);

int rb_link_publish(rb_link *link, amqp_channel_t ch, const char *exchange, const char *routing_key,
                    int mandatory, const amqp_basic_properties_t *props, const void *body, size_t len);

const char *rb_link_error(rb_link *link);

#endif

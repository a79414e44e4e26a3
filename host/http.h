/* An HTTP server on the event loop: libmicrohttpd in its external epoll
 * mode, its one epoll descriptor watched by an rb_loop and its timeouts an
 * rb_timer. libmicrohttpd parses and writes HTTP; this file only binds the
 * socket, drives the daemon and turns a request into a handler call.
 *
 * Two users: the supervisor's metrics endpoint (rb_http_open: GET and HEAD
 * answered at once) and the gateway (rb_http_serve: any method, a bounded
 * body, and answers given later: the connection is suspended until
 * rb_http_reply, so that a request can wait on the broker while the loop
 * serves others). */
#ifndef RB_HTTP_H
#define RB_HTTP_H

#include <stddef.h>

#include "loop.h"

typedef struct rb_http rb_http;
typedef struct rb_http_request rb_http_request;

typedef struct rb_http_response {
    int status;
    const char *content_type; /* static */
    char *body;               /* malloc'd; the server frees it */
    size_t len;
} rb_http_response;

/* Called for each GET or HEAD request (other methods get 405). Sets out;
 * a NULL body with status 0 is a 500. */
typedef void rb_http_handler(void *data, const char *path, rb_http_response *out);

/* Listens on "HOST:PORT" ("[::1]:9100", "0.0.0.0:0"...). NULL with err set. */
rb_http *rb_http_open(rb_loop *loop, const char *listen, rb_http_handler *handler, void *data, char *err,
                      size_t errlen);

/* The gateway's server. */
typedef struct rb_http_config {
    const char *listen;       /* "HOST:PORT", when fd < 0 */
    int fd;                   /* a listening socket to share (dup'd: the caller keeps its own), or -1 */
    unsigned max_connections; /* open connections at most (MHD refuses more) */
    unsigned
        connection_timeout; /* seconds a connection may stay idle, and a request take to arrive (0: none) */
    size_t memory_limit;    /* bytes per connection for the request line and headers */
    size_t max_body;        /* bytes of request body at most: beyond, 413 */
    const char *tls_cert, *tls_key; /* PEM text of both, for HTTPS; NULL: plain HTTP */
    const char *token; /* a bearer token every request must carry (copied), checked with the headers, before
                        * any body is read: 401 without it. NULL: none */
} rb_http_config;

/* Called once per complete request (headers and body in). It must answer,
 * with rb_http_reply, now or later; until then the request is the
 * handler's, and its connection is suspended. */
typedef void rb_http_request_handler(void *data, rb_http_request *req);

rb_http *rb_http_serve(rb_loop *loop, const rb_http_config *cfg, rb_http_request_handler *handler, void *data,
                       char *err, size_t errlen);

const char *rb_http_request_method(const rb_http_request *req);
const char *rb_http_request_path(const rb_http_request *req);
const char *rb_http_request_body(const rb_http_request *req, size_t *len);
/* Calls fn for every header (header != 0) or query argument (header == 0);
 * valid only until the request is answered. */
void rb_http_request_each(const rb_http_request *req, int header,
                          void (*fn)(void *cls, const char *key, const char *value), void *cls);

/* Answers req: status, body (malloc'd, taken), and extra headers as a
 * NULL-terminated list of name, value pairs (copied). A request whose
 * connection has gone (the client left, the server closed) is just freed.
 * req is invalid afterwards. */
void rb_http_reply(rb_http_request *req, int status, const char *content_type, char *body, size_t len,
                   const char *const *headers);

/* A listening socket for "HOST:PORT" that forked workers can share; -1 with
 * err set. Its port in *port. */
int rb_http_listen_socket(const char *listen, int *port, char *err, size_t errlen);

/* Stops accepting connections (a drain); requests under way are answered. */
void rb_http_quiesce(rb_http *h);
void rb_http_close(rb_http *h);
/* In a forked child: close the server's descriptors, listening socket and
 * connections alike, without a word to the peers (the parent serves them). */
void rb_http_drop_after_fork(rb_http *h);
int rb_http_port(const rb_http *h);
/* Requests answered whose answers libmicrohttpd has not finished writing:
 * a drain waits for them too. */
long rb_http_answering(const rb_http *h);
/* A malloc'd copy of s for a response body, its length in *len. */
char *rb_http_text(const char *s, size_t *len);

#endif

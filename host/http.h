/* An HTTP server on the event loop: libmicrohttpd in its external epoll
 * mode, its one epoll descriptor watched by an rb_loop and its timeouts an
 * rb_timer. libmicrohttpd parses and writes HTTP; this file only binds the
 * socket, drives the daemon and turns a request into a handler call. */
#ifndef RB_HTTP_H
#define RB_HTTP_H

#include <stddef.h>

#include "loop.h"

typedef struct rb_http rb_http;

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
void rb_http_close(rb_http *h);
/* In a forked child: close the server's descriptors, listening socket and
 * connections alike, without a word to the peers (the parent serves them). */
void rb_http_drop_after_fork(rb_http *h);
int rb_http_port(const rb_http *h);
/* A malloc'd copy of s for a response body, its length in *len. */
char *rb_http_text(const char *s, size_t *len);

#endif

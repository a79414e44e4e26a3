/* An HTTP server on the event loop (see http.h). libmicrohttpd runs without
 * threads of its own (external mode, MHD_USE_EPOLL): its epoll descriptor
 * is a file event of our loop, and after every MHD_run an rb_timer is armed
 * for the next of its timeouts. The listening socket is ours, so that
 * "HOST:PORT" means what getaddrinfo says and port 0 can be learnt. */
#include "http.h"

#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"

/* A metrics scrape or a probe: never many at once. */
#define MAX_CONNECTIONS 64
#define CONNECTION_TIMEOUT_S 10

struct rb_http {
    rb_loop *loop;
    struct MHD_Daemon *daemon;
    int listen_fd, epoll_fd, port;
    rb_timer timer;
    rb_http_handler *handler;
    void *data;
    int conns[MAX_CONNECTIONS]; /* open connection sockets, for a forked child to close */
    int nconns;
};

static void drive(rb_http *h);

static void on_timer(rb_loop *loop, void *data) {
    (void)loop;
    drive(data);
}

static void on_readable(rb_loop *loop, int fd, void *data, int mask) {
    (void)loop, (void)fd, (void)mask;
    drive(data);
}

/* Runs the daemon, then arms the timer for its next deadline. */
static void drive(rb_http *h) {
    MHD_run(h->daemon);
    MHD_UNSIGNED_LONG_LONG ms;
    if (MHD_get_timeout(h->daemon, &ms) == MHD_YES)
        rb_timer_start(h->loop, &h->timer, (double)ms / 1000.0);
    else
        rb_timer_stop(h->loop, &h->timer);
}

static void log_mhd(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n > 0 && line[n - 1] == '\n') line[--n] = '\0';
    rb_log(RB_LOG_WARN, "http: %s", line);
}

static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe) {
    (void)socket_context;
    rb_http *h = cls;
    const union MHD_ConnectionInfo *info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!info) return;
    int fd = info->connect_fd;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        if (h->nconns < MAX_CONNECTIONS) h->conns[h->nconns++] = fd;
        return;
    }
    for (int i = 0; i < h->nconns; i++)
        if (h->conns[i] == fd) {
            h->conns[i] = h->conns[--h->nconns];
            return;
        }
}

static enum MHD_Result respond(struct MHD_Connection *c, int status, const char *type, char *body,
                               size_t len) {
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED) MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    enum MHD_Result ret = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

char *rb_http_text(const char *s, size_t *len) {
    *len = strlen(s);
    char *p = malloc(*len + 1);
    if (p) memcpy(p, s, *len + 1);
    return p;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **con_cls) {
    (void)version, (void)upload_data;
    rb_http *h = cls;
    static int seen;
    if (*con_cls == NULL) {
        /* The headers: answer once the request (and any body) is in. */
        *con_cls = &seen;
        return MHD_YES;
    }
    if (*upload_data_size) {
        *upload_data_size = 0; /* a body means nothing here */
        return MHD_YES;
    }
    size_t len;
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0) {
        char *body = rb_http_text("method not allowed\n", &len);
        return body ? respond(c, MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", body, len)
                    : MHD_NO;
    }
    rb_http_response out = {0, "text/plain; charset=utf-8", NULL, 0};
    h->handler(h->data, url, &out);
    if (!out.body || !out.status) {
        free(out.body);
        out.body = rb_http_text("internal error\n", &out.len);
        out.status = MHD_HTTP_INTERNAL_SERVER_ERROR;
        out.content_type = "text/plain; charset=utf-8";
        if (!out.body) return MHD_NO;
    }
    return respond(c, out.status, out.content_type, out.body, out.len);
}

/* Splits "HOST:PORT" ("[v6]:PORT" too) and binds a listening socket.
 * The fd, or -1 with err set. */
static int listen_on(const char *listen_at, int *port, char *err, size_t errlen) {
    char host[256];
    const char *colon = strrchr(listen_at, ':');
    if (!colon || colon == listen_at || !colon[1]) {
        snprintf(err, errlen, "'%s' is not HOST:PORT", listen_at);
        return -1;
    }
    size_t hlen = (size_t)(colon - listen_at);
    const char *hstart = listen_at;
    if (hlen >= 2 && hstart[0] == '[' && hstart[hlen - 1] == ']') hstart++, hlen -= 2;
    if (hlen >= sizeof host) {
        snprintf(err, errlen, "host name too long in '%s'", listen_at);
        return -1;
    }
    memcpy(host, hstart, hlen);
    host[hlen] = '\0';
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int rc = getaddrinfo(host, colon + 1, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot resolve '%s': %s", listen_at, gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    snprintf(err, errlen, "cannot listen on %s: no address", listen_at);
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
        if (fd < 0) continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 64) == 0) break;
        snprintf(err, errlen, "cannot listen on %s: %s", listen_at, strerror(errno));
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) return -1;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    *port = 0;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0)
        *port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                               : ((struct sockaddr_in *)&ss)->sin_port);
    return fd;
}

rb_http *rb_http_open(rb_loop *loop, const char *listen_at, rb_http_handler *handler, void *data, char *err,
                      size_t errlen) {
    rb_http *h = calloc(1, sizeof *h);
    if (!h) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    h->loop = loop;
    h->handler = handler;
    h->data = data;
    h->epoll_fd = -1;
    rb_timer_init(&h->timer, on_timer, h);
    h->listen_fd = listen_on(listen_at, &h->port, err, errlen);
    if (h->listen_fd < 0) {
        free(h);
        return NULL;
    }
    /* The logger first: MHD logs with its own until it has read it. */
    h->daemon = MHD_start_daemon(MHD_USE_EPOLL | MHD_USE_ERROR_LOG, 0, NULL, NULL, on_request, h,
                                 MHD_OPTION_EXTERNAL_LOGGER, log_mhd, NULL, MHD_OPTION_LISTEN_SOCKET,
                                 h->listen_fd, MHD_OPTION_CONNECTION_LIMIT, (unsigned)MAX_CONNECTIONS,
                                 MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)CONNECTION_TIMEOUT_S,
                                 MHD_OPTION_NOTIFY_CONNECTION, on_connection, h, MHD_OPTION_END);
    const union MHD_DaemonInfo *info =
        h->daemon ? MHD_get_daemon_info(h->daemon, MHD_DAEMON_INFO_EPOLL_FD) : NULL;
    if (!info || rb_loop_add_file(loop, info->epoll_fd, RB_READABLE, on_readable, h) < 0) {
        snprintf(err, errlen, "cannot start the HTTP server on %s", listen_at);
        rb_http_close(h);
        return NULL;
    }
    h->epoll_fd = info->epoll_fd;
    drive(h);
    return h;
}

void rb_http_close(rb_http *h) {
    if (!h) return;
    rb_timer_stop(h->loop, &h->timer);
    if (h->epoll_fd >= 0) rb_loop_del_file(h->loop, h->epoll_fd);
    if (h->daemon)
        MHD_stop_daemon(h->daemon); /* closes the listening socket it was given */
    else if (h->listen_fd >= 0)
        close(h->listen_fd);
    free(h);
}

void rb_http_drop_after_fork(rb_http *h) {
    if (!h) return;
    rb_timer_stop(h->loop, &h->timer);
    for (int i = 0; i < h->nconns; i++) close(h->conns[i]);
    h->nconns = 0;
    if (h->epoll_fd >= 0) close(h->epoll_fd);
    if (h->listen_fd >= 0) close(h->listen_fd);
    h->epoll_fd = h->listen_fd = -1;
}

int rb_http_port(const rb_http *h) {
    return h->port;
}

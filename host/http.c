/* An HTTP server on the event loop (see http.h). libmicrohttpd runs without
 * threads of its own (external mode, MHD_USE_EPOLL): its epoll descriptor
 * is a file event of our loop, and after every MHD_run an rb_timer is armed
 * for the next of its timeouts. The listening socket is ours, so that
 * "HOST:PORT" means what getaddrinfo says and port 0 can be learnt. */
#include "http.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "deadlines.h"
#include "log.h"

/* The metrics endpoint: a scrape or a probe, never many at once. */
#define METRICS_CONNECTIONS 64
#define METRICS_TIMEOUT_S 10
/* Open connection sockets remembered for a forked child to close; a
 * gateway with more connections is never forked (only workers run one). */
#define TRACKED_CONNECTIONS 64

/* A connection's deadline: its request (headers and body) must be in
 * within the client timeout of the connection opening or of its previous
 * request ending. libmicrohttpd's own timeout counts idle time only, so a
 * client sending a byte now and then would hold its connection for ever. */
typedef struct conn_rec {
    rb_http *h;
    int fd;
    rb_deadline deadline; /* in h->deadlines */
} conn_rec;

struct rb_http_request {
    rb_http *h;
    conn_rec *cr;                /* its connection's, or NULL (none could be made) */
    struct MHD_Connection *conn; /* NULL once libmicrohttpd is done with it */
    char *method, *path;
    char *body;
    size_t len, cap;
    int too_big;    /* a body over max_body: answered 413 */
    size_t overrun; /* bytes of body past max_body, read and dropped */
    int refused;    /* answered with the headers (401): its body is not read */
    int dispatched; /* the handler has it */
    int suspended;  /* its connection waits for rb_http_reply */
    int answered;   /* rb_http_reply was called: resp holds the answer */
    int counted;    /* in h->answering until libmicrohttpd reports it completed */
    int closing;    /* the server closes with the request unanswered */
    struct MHD_Response *resp;
    int status;
    rb_http_request *prev, *next; /* the handler's (dispatched, unanswered), for close */
};

struct rb_http {
    rb_loop *loop;
    struct MHD_Daemon *daemon;
    int listen_fd, epoll_fd, port;
    size_t max_body;
    char *token; /* the bearer token requests must carry, or NULL */
    rb_timer timer;
    rb_http_request_handler *handler;
    void *data;
    rb_http_handler *simple; /* rb_http_open's handler, called by answer_simple */
    void *simple_data;
    rb_http_request *pending;
    long answering;                 /* requests answered whose answers are not yet all written */
    int conns[TRACKED_CONNECTIONS]; /* open connection sockets, for a forked child to close */
    int nconns;
    int closed;                  /* a connection closed during MHD_run: run it again (see drive) */
    double client_timeout;       /* seconds; 0: no deadline */
    rb_deadline_queue deadlines; /* connections with a deadline armed */
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

/* Runs the daemon, then arms the timer for its next deadline.
 *
 * At its connection limit libmicrohttpd takes the listening socket out of
 * its epoll set, and puts it back only at the start of a later MHD_run,
 * once a connection has closed. A run that closed one (a timeout, a client
 * gone) is followed by another, or the socket stays out: nothing would
 * wake the loop for it, and no connection would ever be accepted again. */
static void drive(rb_http *h) {
    MHD_run(h->daemon);
    while (h->closed) {
        h->closed = 0;
        MHD_run(h->daemon);
    }
    MHD_UNSIGNED_LONG_LONG ms;
    if (MHD_get_timeout(h->daemon, &ms) == MHD_YES)
        rb_timer_start(h->loop, &h->timer, (double)ms / 1000.0);
    else
        rb_timer_stop(h->loop, &h->timer);
}

/* ---- connection deadlines ---- */

static void disarm(conn_rec *cr) {
    if (cr) rb_deadlines_remove(&cr->h->deadlines, &cr->deadline);
}

/* Starts cr's deadline, from now. Every deadline is now + the same
 * timeout, so one queue keeps them in order. */
static void arm(conn_rec *cr) {
    if (!cr || cr->h->client_timeout <= 0) return;
    /* No memory for the timer: libmicrohttpd's idle timeout only. */
    (void)rb_deadlines_add(&cr->h->deadlines, &cr->deadline);
}

/* Closes a connection past its deadline: shutdown() wakes libmicrohttpd's
 * epoll, which finds the socket at its end and closes the connection the
 * ordinary way. */
static void on_deadline(rb_deadline *d, void *data) {
    rb_http *h = data;
    conn_rec *cr = rb_deadline_owner(d, conn_rec, deadline);
    rb_log(RB_LOG_DEBUG, "http: closing a connection whose request took over %g s", h->client_timeout);
    shutdown(cr->fd, SHUT_RDWR);
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
    rb_http *h = cls;
    if (toe == MHD_CONNECTION_NOTIFY_CLOSED) {
        h->closed = 1;
        conn_rec *cr = *socket_context;
        *socket_context = NULL;
        disarm(cr);
        free(cr);
    }
    const union MHD_ConnectionInfo *info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!info) return;
    int fd = info->connect_fd;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        if (h->nconns < TRACKED_CONNECTIONS) h->conns[h->nconns++] = fd;
        conn_rec *cr = calloc(1, sizeof *cr);
        if (cr) { /* else the connection has libmicrohttpd's idle timeout only */
            cr->h = h;
            cr->fd = fd;
            *socket_context = cr;
            arm(cr);
        }
        return;
    }
    for (int i = 0; i < h->nconns; i++)
        if (h->conns[i] == fd) {
            h->conns[i] = h->conns[--h->nconns];
            return;
        }
}

char *rb_http_text(const char *s, size_t *len) {
    *len = strlen(s);
    char *p = malloc(*len + 1);
    if (p) memcpy(p, s, *len + 1);
    return p;
}

/* ---- requests ---- */

static void unlink_pending(rb_http_request *req) {
    if (!req->h) return;
    if (req->prev)
        req->prev->next = req->next;
    else if (req->h->pending == req)
        req->h->pending = req->next;
    if (req->next) req->next->prev = req->prev;
    req->prev = req->next = NULL;
}

static void request_free(rb_http_request *req) {
    if (req->resp) MHD_destroy_response(req->resp);
    free(req->method);
    free(req->path);
    free(req->body);
    free(req);
}

static rb_http_request *request_new(rb_http *h, struct MHD_Connection *c, const char *method,
                                    const char *url) {
    rb_http_request *req = calloc(1, sizeof *req);
    if (!req) return NULL;
    req->h = h;
    req->conn = c;
    const union MHD_ConnectionInfo *info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    req->cr = info ? info->socket_context : NULL;
    req->method = strdup(method);
    req->path = strdup(url);
    if (!req->method || !req->path) {
        request_free(req);
        return NULL;
    }
    return req;
}

const char *rb_http_request_method(const rb_http_request *req) {
    return req->method;
}

const char *rb_http_request_path(const rb_http_request *req) {
    return req->path;
}

const char *rb_http_request_body(const rb_http_request *req, size_t *len) {
    *len = req->len;
    return req->body ? req->body : "";
}

typedef struct {
    void (*fn)(void *cls, const char *key, const char *value);
    void *cls;
} each_ctx;

static enum MHD_Result each_value(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    (void)kind;
    each_ctx *e = cls;
    e->fn(e->cls, key, value ? value : "");
    return MHD_YES;
}

void rb_http_request_each(const rb_http_request *req, int header,
                          void (*fn)(void *cls, const char *key, const char *value), void *cls) {
    if (!req->conn) return;
    each_ctx e = {fn, cls};
    MHD_get_connection_values(req->conn, header ? MHD_HEADER_KIND : MHD_GET_ARGUMENT_KIND, each_value, &e);
}

void rb_http_reply(rb_http_request *req, int status, const char *content_type, char *body, size_t len,
                   const char *const *headers) {
    if (!req->conn) { /* the connection has gone: nobody to answer */
        free(body);
        request_free(req);
        return;
    }
    unlink_pending(req);
    req->answered = 1;
    req->counted = 1;
    req->h->answering++;
    req->status = status;
    req->resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!req->resp) {
        free(body); /* the connection is closed without an answer */
    } else {
        MHD_add_response_header(req->resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
        for (const char *const *p = headers; p && p[0] && p[1]; p += 2)
            MHD_add_response_header(req->resp, p[0], p[1]);
    }
    if (req->suspended) {
        req->suspended = 0;
        MHD_resume_connection(req->conn);
        /* The daemon sends the answer when it next runs: at once, from the
         * timer (not here: this may run inside one of its callbacks). Its
         * eventfd alone does not wake the loop in external epoll mode. */
        rb_timer_start(req->h->loop, &req->h->timer, 0);
    }
}

/* Queues req's answer (NULL: none could be made: the connection closes). */
static enum MHD_Result send_answer(struct MHD_Connection *c, rb_http_request *req) {
    if (!req->resp) return MHD_NO;
    enum MHD_Result ret = MHD_queue_response(c, (unsigned)req->status, req->resp);
    MHD_destroy_response(req->resp);
    req->resp = NULL;
    return ret;
}

/* The server's own answer, in the gateway's shape: {"kind", "message"}. */
static void reply_error(rb_http_request *req, int status, const char *kind, const char *message,
                        const char *const *headers) {
    char text[512];
    snprintf(text, sizeof text, "{\"kind\":\"%s\",\"message\":\"%s\"}\n", kind, message);
    size_t len;
    char *body = rb_http_text(text, &len);
    rb_http_reply(req, status, "application/json", body, body ? len : 0, headers);
}

static void body_too_big(rb_http_request *req) {
    char msg[160];
    snprintf(msg, sizeof msg, "the request body is over the limit of %zu bytes", req->h->max_body);
    reply_error(req, MHD_HTTP_CONTENT_TOO_LARGE, "body_too_large", msg, NULL);
}

/* Bytes of body read and dropped past max_body, at least: a body (chunked:
 * no Content-Length said so) that ends within them is answered 413; one
 * that does not is cut, its connection closed. libmicrohttpd 0.9 queues no
 * answer before the body has ended, so 413 cannot come sooner. */
#define MIN_BODY_OVERRUN (64 * 1024)

/* Appends a piece of body, or notes it went over the limit (the rest is
 * read and dropped, then 413). Returns 0 once the body has run so far past
 * the limit that its connection is closed unanswered. */
static int take_body(rb_http_request *req, const char *data, size_t n) {
    if (req->too_big) {
        size_t allowed = req->h->max_body > MIN_BODY_OVERRUN ? req->h->max_body : MIN_BODY_OVERRUN;
        if (n > allowed - req->overrun) {
            rb_log(RB_LOG_INFO,
                   "http: a request body went on %zu bytes past the limit of %zu: connection closed", allowed,
                   req->h->max_body);
            return 0;
        }
        req->overrun += n;
        return 1;
    }
    if (n > req->h->max_body - req->len) {
        req->too_big = 1;
        free(req->body);
        req->body = NULL;
        req->overrun = n - (req->h->max_body - req->len);
        req->len = req->cap = 0;
        return 1;
    }
    if (req->len + n > req->cap) {
        size_t cap = req->cap ? req->cap : 1024;
        while (cap < req->len + n) cap *= 2;
        char *p = realloc(req->body, cap);
        if (!p) {
            req->too_big = 1; /* out of memory reads as too large a body */
            return 1;
        }
        req->body = p;
        req->cap = cap;
    }
    memcpy(req->body + req->len, data, n);
    req->len += n;
    return 1;
}

/* Whether an Authorization header's value is "Bearer TOKEN": the scheme in
 * any case (RFC 7235), the token compared in a time that does not depend on
 * where it differs (only on the expected token's length). */
static int authorised(const char *value, const char *token) {
    if (!value || strncasecmp(value, "bearer", 6) != 0 || (value[6] != ' ' && value[6] != '\t')) return 0;
    const char *p = value + 7;
    while (*p == ' ' || *p == '\t') p++;
    size_t n = strcspn(p, " \t");
    for (const char *q = p + n; *q; q++)
        if (*q != ' ' && *q != '\t') return 0;
    size_t tn = strlen(token);
    unsigned char d = n != tn;
    for (size_t i = 0; i < tn; i++)
        d |= (unsigned char)((unsigned char)(i < n ? p[i] : 0) ^ (unsigned char)token[i]);
    return d == 0;
}

/* The headers are in: a request without the bearer token, or with a
 * Content-Length over the limit, is answered at once (libmicrohttpd then
 * closes the connection instead of reading the body). */
static enum MHD_Result on_headers(struct MHD_Connection *c, rb_http_request *req) {
    if (req->h->token &&
        !authorised(MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION),
                    req->h->token)) {
        static const char *const challenge[] = {MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer realm=\"rabihost\"",
                                                NULL};
        req->refused = 1;
        disarm(req->cr); /* in: the answer is being sent */
        reply_error(req, MHD_HTTP_UNAUTHORIZED, "unauthorized",
                    "a bearer token is needed: Authorization: Bearer TOKEN", challenge);
        return send_answer(c, req);
    }
    const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl && strtoull(cl, NULL, 10) > req->h->max_body) {
        req->too_big = 1;
        disarm(req->cr); /* in: the answer is being sent */
        body_too_big(req);
        return send_answer(c, req);
    }
    return MHD_YES;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **con_cls) {
    (void)version;
    rb_http *h = cls;
    rb_http_request *req = *con_cls;
    if (!req) {
        req = request_new(h, c, method, url);
        if (!req) return MHD_NO;
        *con_cls = req;
        return on_headers(c, req);
    }
    if (*upload_data_size) {
        if (!req->refused && !take_body(req, upload_data, *upload_data_size)) return MHD_NO;
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (req->closing) return MHD_NO;
    if (req->answered) return send_answer(c, req); /* resumed, or answered early */
    if (req->dispatched) return MHD_YES;
    disarm(req->cr); /* the request is in: its answer may take its time */
    if (req->too_big) {
        body_too_big(req);
        return send_answer(c, req);
    }
    req->dispatched = 1;
    req->next = h->pending;
    if (h->pending) h->pending->prev = req;
    h->pending = req;
    h->handler(h->data, req);
    if (req->answered) return send_answer(c, req);
    req->suspended = 1;
    MHD_suspend_connection(c);
    return MHD_YES;
}

/* The request is over (answered, or its connection gone): freed, unless
 * the handler still holds it (then rb_http_reply frees it). */
static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    (void)cls, (void)c, (void)toe;
    rb_http_request *req = *con_cls;
    if (!req) return;
    *con_cls = NULL;
    if (req->counted) {
        req->counted = 0;
        req->h->answering--;
    }
    arm(req->cr); /* the next request on the connection: from now */
    req->cr = NULL;
    req->conn = NULL;
    if (req->dispatched && !req->answered) {
        unlink_pending(req);
        req->h = NULL;
        return;
    }
    request_free(req);
}

/* ---- the metrics endpoint's handler ---- */

static void answer_simple(void *data, rb_http_request *req) {
    rb_http *h = data;
    size_t len;
    const char *allow[] = {MHD_HTTP_HEADER_ALLOW, "GET, HEAD", NULL};
    if (strcmp(req->method, MHD_HTTP_METHOD_GET) != 0 && strcmp(req->method, MHD_HTTP_METHOD_HEAD) != 0) {
        char *body = rb_http_text("method not allowed\n", &len);
        rb_http_reply(req, MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", body, body ? len : 0,
                      allow);
        return;
    }
    rb_http_response out = {0, "text/plain; charset=utf-8", NULL, 0};
    h->simple(h->simple_data, req->path, &out);
    if (!out.body || !out.status) {
        free(out.body);
        out.body = rb_http_text("internal error\n", &out.len);
        out.status = MHD_HTTP_INTERNAL_SERVER_ERROR;
        out.content_type = "text/plain; charset=utf-8";
    }
    rb_http_reply(req, out.status, out.content_type, out.body, out.len, NULL);
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
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0) break;
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

int rb_http_listen_socket(const char *listen_at, int *port, char *err, size_t errlen) {
    return listen_on(listen_at, port, err, errlen);
}

static int local_port(int fd) {
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) return 0;
    return ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                          : ((struct sockaddr_in *)&ss)->sin_port);
}

/* The listening socket the daemon will own: a dup of a shared one, or one
 * bound here. -1 with err set. */
static int own_listen_socket(const rb_http_config *cfg, int *port, char *err, size_t errlen) {
    if (cfg->fd < 0) return listen_on(cfg->listen, port, err, errlen);
    int fd = fcntl(cfg->fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "cannot share the listening socket: %s", strerror(errno));
        return -1;
    }
    *port = local_port(fd);
    return fd;
}

static struct MHD_Daemon *start_daemon(rb_http *h, const rb_http_config *cfg) {
    unsigned flags = MHD_USE_EPOLL | MHD_USE_ERROR_LOG | MHD_ALLOW_SUSPEND_RESUME;
    size_t memory = cfg->memory_limit ? cfg->memory_limit : 32 * 1024;
    struct MHD_OptionItem opts[] = {
        /* The logger first: MHD logs with its own until it has read it. */
        {MHD_OPTION_EXTERNAL_LOGGER, (intptr_t)log_mhd, NULL},
        {MHD_OPTION_LISTEN_SOCKET, h->listen_fd, NULL},
        {MHD_OPTION_CONNECTION_LIMIT, (intptr_t)cfg->max_connections, NULL},
        {MHD_OPTION_CONNECTION_TIMEOUT, (intptr_t)cfg->connection_timeout, NULL},
        {MHD_OPTION_CONNECTION_MEMORY_LIMIT, (intptr_t)memory, NULL},
        {MHD_OPTION_NOTIFY_CONNECTION, (intptr_t)on_connection, h},
        {MHD_OPTION_NOTIFY_COMPLETED, (intptr_t)on_completed, h},
        {MHD_OPTION_END, 0, NULL}, /* room for the two TLS options */
        {MHD_OPTION_END, 0, NULL},
        {MHD_OPTION_END, 0, NULL},
    };
    if (cfg->tls_cert && cfg->tls_key) {
        flags |= MHD_USE_TLS;
        opts[7] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, (void *)cfg->tls_cert};
        opts[8] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, (void *)cfg->tls_key};
    }
    return MHD_start_daemon(flags, 0, NULL, NULL, on_request, h, MHD_OPTION_ARRAY, opts, MHD_OPTION_END);
}

static void free_token(rb_http *h) {
    if (!h->token) return;
    explicit_bzero(h->token, strlen(h->token));
    free(h->token);
    h->token = NULL;
}

rb_http *rb_http_serve(rb_loop *loop, const rb_http_config *cfg, rb_http_request_handler *handler, void *data,
                       char *err, size_t errlen) {
    if (cfg->tls_cert && cfg->tls_key && MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES) {
        snprintf(err, errlen, "this libmicrohttpd was built without TLS: HTTPS is not available");
        return NULL;
    }
    rb_http *h = calloc(1, sizeof *h);
    if (!h) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    h->loop = loop;
    h->handler = handler;
    h->data = data;
    h->max_body = cfg->max_body;
    h->client_timeout = cfg->connection_timeout;
    h->epoll_fd = -1;
    rb_timer_init(&h->timer, on_timer, h);
    rb_deadlines_init(&h->deadlines, loop, on_deadline, h);
    h->deadlines.delay_ms = rb_ms_of(h->client_timeout);
    if (cfg->token && !(h->token = strdup(cfg->token))) {
        snprintf(err, errlen, "out of memory");
        free(h);
        return NULL;
    }
    h->listen_fd = own_listen_socket(cfg, &h->port, err, errlen);
    if (h->listen_fd < 0) {
        free_token(h);
        free(h);
        return NULL;
    }
    h->daemon = start_daemon(h, cfg);
    const union MHD_DaemonInfo *info =
        h->daemon ? MHD_get_daemon_info(h->daemon, MHD_DAEMON_INFO_EPOLL_FD) : NULL;
    if (!info || rb_loop_add_file(loop, info->epoll_fd, RB_READABLE, on_readable, h) < 0) {
        snprintf(err, errlen, "cannot start the HTTP server on %s%s",
                 cfg->listen ? cfg->listen : "a shared socket",
                 cfg->tls_cert ? " (is the TLS certificate and key PEM, and do they match?)" : "");
        rb_http_close(h);
        return NULL;
    }
    h->epoll_fd = info->epoll_fd;
    drive(h);
    return h;
}

rb_http *rb_http_open(rb_loop *loop, const char *listen_at, rb_http_handler *handler, void *data, char *err,
                      size_t errlen) {
    rb_http_config cfg = {listen_at, -1,  METRICS_CONNECTIONS, METRICS_TIMEOUT_S, 0, 64 * 1024, NULL,
                          NULL,      NULL};
    rb_http *h = rb_http_serve(loop, &cfg, answer_simple, NULL, err, errlen);
    if (!h) return NULL;
    h->data = h;
    h->simple = handler;
    h->simple_data = data;
    return h;
}

void rb_http_quiesce(rb_http *h) {
    if (!h || !h->daemon || h->listen_fd < 0) return;
    MHD_socket fd = MHD_quiesce_daemon(h->daemon);
    if (fd != MHD_INVALID_SOCKET) close(fd);
    h->listen_fd = -1;
}

void rb_http_close(rb_http *h) {
    if (!h) return;
    rb_timer_stop(h->loop, &h->timer);
    rb_deadlines_stop(&h->deadlines);
    if (h->epoll_fd >= 0) rb_loop_del_file(h->loop, h->epoll_fd);
    /* libmicrohttpd refuses to stop with connections suspended: resume
     * them, to be closed unanswered; their handlers keep their requests
     * until they answer (rb_http_reply then frees them). */
    for (rb_http_request *req = h->pending; req; req = req->next) {
        req->closing = 1;
        if (req->suspended) {
            req->suspended = 0;
            MHD_resume_connection(req->conn);
        }
    }
    if (h->daemon)
        MHD_stop_daemon(h->daemon); /* closes the listening socket it was given */
    else if (h->listen_fd >= 0)
        close(h->listen_fd);
    while (h->pending) { /* in case the daemon did not report them completed */
        rb_http_request *req = h->pending;
        unlink_pending(req);
        req->conn = NULL;
        req->h = NULL;
    }
    free_token(h);
    free(h);
}

void rb_http_drop_after_fork(rb_http *h) {
    if (!h) return;
    rb_timer_stop(h->loop, &h->timer);
    rb_deadlines_stop(&h->deadlines);
    for (int i = 0; i < h->nconns; i++) close(h->conns[i]);
    h->nconns = 0;
    if (h->epoll_fd >= 0) close(h->epoll_fd);
    if (h->listen_fd >= 0) close(h->listen_fd);
    h->epoll_fd = h->listen_fd = -1;
}

long rb_http_answering(const rb_http *h) {
    return h->answering;
}

int rb_http_port(const rb_http *h) {
    return h->port;
}

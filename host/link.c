/* A broker link. rabbitmq-c is a blocking library; it is made to serve an
 * event loop by reading only when the socket is readable (or rabbitmq-c
 * already holds bytes or decoded frames), always with a zero timeout, and by
 * assembling content frames into messages here rather than with
 * amqp_consume_message, so that deliveries, returns and confirms of every
 * channel arrive through one path. */
#include "link.h"

#include <amqp_framing.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <errno.h>
#include <poll.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <openssl/ssl.h>

#include "log.h"
#include "url.h"

enum { ASSEMBLE_NONE, ASSEMBLE_DELIVERY, ASSEMBLE_RETURN };

typedef struct {
    uint64_t tag;
    int done;
} owed_ack;

typedef struct {
    const rb_channel_handler *handler;
    void *data;
    /* the message being assembled from method, header and body frames */
    int assembling;
    uint64_t delivery_tag;
    int redelivered, reply_code;
    char reply_text[256], reply_to[256], correlation_id[256], expiration[32];
    int has_reply_to, has_correlation_id;
    int64_t deadline_ms, delivery_count;
    char traceparent[64];
    char timeout_text[256], death_queue[256], death_reason[32];
    uint64_t body_size, received;
    int have_header;
    rb_buf body;
    /* deliveries owed an ack, in delivery order */
    owed_ack *owed;
    int nowed, capowed, ndone;
} channel_state;

struct rb_link {
    rb_loop *loop;
    amqp_connection_state_t conn;
    int fd;
    int open;
    int attached; /* driven by its loop (see link_attach); before, only one thread uses it */
    int pumping, close_requested;
    size_t max_body;       /* larger bodies are counted, not stored */
    uint64_t last_read_ms; /* when the socket was last read */
    channel_state **channels;
    int nchannels;
    void (*on_lost)(rb_link *, void *, const char *);
    void *lost_data;
    rb_timer heartbeat_timer;
    int heartbeat;
    int url_index;      /* which URL of the list it is connected to */
    int gather;         /* plain TCP: frames are gathered in out (see link_flush) */
    int flush_deferred; /* queued to write out at the end of the loop's step (defer_flush) */
    uint64_t written;   /* bytes of out handed to the kernel, ever (rb_link_written) */
    rb_buf out;         /* whole frames not yet written, in order */
    int send_timeout_ms;
    /* read batching (see batch_reads) */
    size_t replies_due;   /* deliveries the owner expects (rb_link_expect_replies) */
    int rcvlowat;         /* the socket's SO_RCVLOWAT, 1 when not batching */
    int batch_cap;        /* the largest threshold the flow lately filled; 0: off */
    int woken;            /* the kernel said the socket is readable (on_readable) */
    uint64_t delivered;   /* messages handed to the channels' handlers, ever */
    rb_timer batch_timer; /* reads what has come, should the kernel not wake us */
    char error[512];
};

static void link_pump(rb_link *link);
static int link_flush(rb_link *link);
static void unbatch_reads(rb_link *link);
static int flush_deferred(rb_loop *loop, void *data);
static void send_now(rb_link *link, amqp_channel_t ch, amqp_method_number_t id, void *decoded);

/* Whoever uses the connection directly (an RPC) writes after what the link
 * gathered, never before it. */
amqp_connection_state_t rb_link_conn(rb_link *link) {
    link_flush(link);
    unbatch_reads(link); /* its blocking read must wake for a short reply */
    return link->conn;
}
int rb_link_is_open(const rb_link *link) {
    return link && link->open;
}
uint64_t rb_link_written(const rb_link *link) {
    return link->written;
}
uint64_t rb_link_gathered_end(const rb_link *link) {
    return link->written + link->out.len;
}

void rb_link_set_max_body(rb_link *link, size_t max_body) {
    link->max_body = max_body;
}

/* Before using a link that has been quiet for a while, read what the socket
 * holds: a broker that went away meanwhile left an end-of-file there, and
 * finding it now beats publishing into a dead connection. */
int rb_link_check_alive(rb_link *link) {
    if (link && link->open && rb_now_ms() - link->last_read_ms > 250) link_pump(link);
    return rb_link_is_open(link);
}
int rb_link_channel_max(const rb_link *link) {
    int n = link ? amqp_get_channel_max(link->conn) : 0;
    return n > 0 ? n : 65535; /* 0: the broker sets no limit */
}

const char *rb_link_error(rb_link *link) {
    return link->error;
}

void rb_link_on_lost(rb_link *link, void (*proc)(rb_link *, void *, const char *), void *data) {
    link->on_lost = proc;
    link->lost_data = data;
}

static void copy_bytes(char *dst, size_t cap, amqp_bytes_t b) {
    size_t n = b.len < cap - 1 ? b.len : cap - 1;
    if (n) memcpy(dst, b.bytes, n);
    dst[n] = '\0';
}

/* ---- reply checking ---- */

static void describe_reply(amqp_rpc_reply_t r, const char *what, char *err, size_t errlen) {
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL: snprintf(err, errlen, "%s: ok", what); break;
    case AMQP_RESPONSE_NONE: snprintf(err, errlen, "%s: no reply from the broker", what); break;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        snprintf(err, errlen, "%s: %s", what, amqp_error_string2(r.library_error));
        break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            amqp_connection_close_t *c = r.reply.decoded;
            snprintf(err, errlen, "%s: connection closed by the broker: %.*s", what, (int)c->reply_text.len,
                     (char *)c->reply_text.bytes);
        } else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            amqp_channel_close_t *c = r.reply.decoded;
            snprintf(err, errlen, "%s: %.*s", what, (int)c->reply_text.len, (char *)c->reply_text.bytes);
        } else {
            snprintf(err, errlen, "%s: unexpected method 0x%08x from the broker", what, (unsigned)r.reply.id);
        }
        break;
    }
}

static void link_lost(rb_link *link, const char *why) {
    if (!link->open) return;
    link->open = 0;
    link->out.len = 0; /* the broker requeues what these frames would have acked */
    snprintf(link->error, sizeof link->error, "%s", why);
    rb_loop_del_file(link->loop, link->fd);
    rb_timer_stop(link->loop, &link->heartbeat_timer);
    rb_timer_stop(link->loop, &link->batch_timer);
    rb_log(RB_LOG_WARN, "broker connection lost: %s", why);
    if (link->on_lost) link->on_lost(link, link->lost_data, why);
}

int rb_link_check_reply(rb_link *link, amqp_channel_t ch, const char *what, char *err, size_t errlen) {
    amqp_rpc_reply_t r = amqp_get_rpc_reply(link->conn);
    if (r.reply_type == AMQP_RESPONSE_NORMAL) return 0;
    describe_reply(r, what, err, errlen);
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        /* The channel is closed but the connection lives: confirm the close so
         * that the channel number can be opened again. */
        amqp_channel_close_ok_t ok = {0};
        send_now(link, ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
    } else if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        link_lost(link, err);
    }
    return -1;
}

/* ---- gathered writes ----
 * rabbitmq-c writes each frame with a send() of its own: three for a
 * publish, one for an ack. On plain TCP the link encodes frames into out
 * instead. While it pumps (the replies its deliveries' handlers publish, and
 * their acks) they are written with one send() once the frames read are
 * handled. Publishes made in a step of the loop otherwise (a client's
 * requests from the tasks the scheduler resumes, the replies of handlers
 * that waited, a gateway's calls) are written once at the step's end
 * (defer_flush, rb_loop_defer): one send() for all the calls a step
 * started, where a send() each cost the client most of its CPU. The
 * trade-off: a request waits for the other callbacks of its step; one that
 * holds the loop holds it too. Outside the loop (a script's main chunk,
 * which may not come back to it soon) a publish is written at once, with
 * one send() rather than three. Whoever uses the connection directly
 * (rb_link_conn) writes after out. A TLS link writes through rabbitmq-c as
 * before. */

/* A body above this goes out at once through rabbitmq-c, not copied. */
#define GATHER_BODY_MAX ((size_t)64 * 1024)
/* Gathered bytes past this are written without waiting for the turn's end. */
#define GATHER_FLUSH_AT ((size_t)256 * 1024)
#define FRAME_OVERHEAD 8 /* type, channel, size; the end octet */

/* Writes out's bytes, all of them (waiting while the socket is full): a
 * partial frame left behind would corrupt what rabbitmq-c writes next.
 * -> 0, or -1 when the link was lost. */
static int link_flush(rb_link *link) {
    /* Nothing gathered is nothing to fail: a link being opened on its own
     * thread is not open yet, and its set-up RPCs come through here. */
    if (!link->out.len) return 0;
    size_t done = 0;
    while (link->open && done < link->out.len) {
        ssize_t n = send(link->fd, link->out.data + done, link->out.len - done, MSG_NOSIGNAL);
        if (n >= 0) {
            done += (size_t)n;
            link->written += (uint64_t)n;
            continue;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            struct pollfd p = {link->fd, POLLOUT, 0};
            int r = poll(&p, 1, link->send_timeout_ms);
            if (r > 0 || (r < 0 && errno == EINTR)) continue;
            link_lost(link, r == 0 ? "the broker stopped reading (send timed out)" : strerror(errno));
            return -1;
        }
        link_lost(link, strerror(errno));
        return -1;
    }
    link->out.len = 0;
    return link->open ? 0 : -1;
}

/* Outside a pump nothing waits for the end of one: write now. */
static int flush_unless_pumping(rb_link *link) {
    return link->pumping ? 0 : link_flush(link);
}

static void put_frame_header(char *p, uint8_t type, amqp_channel_t ch, size_t size) {
    p[0] = (char)type;
    p[1] = (char)(ch >> 8);
    p[2] = (char)ch;
    p[3] = (char)(size >> 24);
    p[4] = (char)(size >> 16);
    p[5] = (char)(size >> 8);
    p[6] = (char)size;
    p[7 + size] = (char)AMQP_FRAME_END;
}

static void put_u16(char *p, uint16_t v) {
    p[0] = (char)(v >> 8);
    p[1] = (char)v;
}

static void put_u32(char *p, uint32_t v) {
    put_u16(p, (uint16_t)(v >> 16));
    put_u16(p + 2, (uint16_t)v);
}

static void put_u64(char *p, uint64_t v) {
    put_u32(p, (uint32_t)(v >> 32));
    put_u32(p + 4, (uint32_t)v);
}

/* Room in out for one frame of any payload the broker accepts. */
static int reserve_frame(rb_link *link) {
    size_t frame_max = (size_t)amqp_get_frame_max(link->conn);
    if (rb_buf_reserve(&link->out, link->out.len + frame_max + FRAME_OVERHEAD) < 0) {
        link_lost(link, "out of memory for outgoing frames");
        return -1;
    }
    return 0;
}

/* A method frame into out. -> 0, or -1 (the link lost) */
static int gather_method(rb_link *link, amqp_channel_t ch, amqp_method_number_t id, void *decoded) {
    if (reserve_frame(link) < 0) return -1;
    char *p = link->out.data + link->out.len;
    size_t room = (size_t)amqp_get_frame_max(link->conn) - FRAME_OVERHEAD - 4;
    put_u32(p + 7, id);
    int n = amqp_encode_method(id, decoded, (amqp_bytes_t){room, p + 11});
    if (n < 0) {
        link_lost(link, amqp_error_string2(n));
        return -1;
    }
    put_frame_header(p, AMQP_FRAME_METHOD, ch, (size_t)n + 4);
    link->out.len += (size_t)n + 4 + FRAME_OVERHEAD;
    return 0;
}

/* A content header frame (basic class) into out. */
static int gather_header(rb_link *link, amqp_channel_t ch, const amqp_basic_properties_t *props, size_t len) {
    if (reserve_frame(link) < 0) return -1;
    char *p = link->out.data + link->out.len;
    size_t room = (size_t)amqp_get_frame_max(link->conn) - FRAME_OVERHEAD - 12;
    put_u16(p + 7, AMQP_BASIC_CLASS);
    put_u16(p + 9, 0); /* weight */
    put_u64(p + 11, len);
    int n = amqp_encode_properties(AMQP_BASIC_CLASS, (void *)props, (amqp_bytes_t){room, p + 19});
    if (n < 0) {
        link_lost(link, amqp_error_string2(n));
        return -1;
    }
    put_frame_header(p, AMQP_FRAME_HEADER, ch, (size_t)n + 12);
    link->out.len += (size_t)n + 12 + FRAME_OVERHEAD;
    return 0;
}

/* The body frames of a message into out, each at most frame_max long. */
static int gather_body(rb_link *link, amqp_channel_t ch, const char *body, size_t len) {
    size_t chunk = (size_t)amqp_get_frame_max(link->conn) - FRAME_OVERHEAD;
    for (size_t off = 0; off < len; off += chunk) {
        size_t n = len - off < chunk ? len - off : chunk;
        if (rb_buf_reserve(&link->out, link->out.len + n + FRAME_OVERHEAD) < 0) {
            link_lost(link, "out of memory for outgoing frames");
            return -1;
        }
        char *p = link->out.data + link->out.len;
        memcpy(p + 7, body + off, n);
        put_frame_header(p, AMQP_FRAME_BODY, ch, n);
        link->out.len += n + FRAME_OVERHEAD;
    }
    return 0;
}

/* A method without content (ack, reject, close-ok): gathered, or sent. */
static void link_method(rb_link *link, amqp_channel_t ch, amqp_method_number_t id, void *decoded) {
    if (link->gather) {
        if (gather_method(link, ch, id, decoded) == 0) flush_unless_pumping(link);
    } else
        amqp_send_method(link->conn, ch, id, decoded);
}

/* A method through rabbitmq-c at once, after what was gathered: for the
 * replies to the broker's closes, which the next RPC must follow. */
static void send_now(rb_link *link, amqp_channel_t ch, amqp_method_number_t id, void *decoded) {
    if (link_flush(link) == 0) amqp_send_method(link->conn, ch, id, decoded);
}

static void link_ack(rb_link *link, amqp_channel_t ch, uint64_t tag, int multiple) {
    amqp_basic_ack_t ack = {tag, (amqp_boolean_t)(multiple != 0)};
    link_method(link, ch, AMQP_BASIC_ACK_METHOD, &ack);
}

/* ---- channels ---- */

static channel_state *channel_get(rb_link *link, amqp_channel_t ch) {
    return ch < link->nchannels ? link->channels[ch] : NULL;
}

int rb_link_channel_open(rb_link *link, amqp_channel_t ch, const rb_channel_handler *h, void *data, char *err,
                         size_t errlen) {
    if (ch >= link->nchannels) {
        int n = ch + 16;
        channel_state **grown = realloc(link->channels, (size_t)n * sizeof *grown);
        if (!grown) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        memset(grown + link->nchannels, 0, (size_t)(n - link->nchannels) * sizeof *grown);
        link->channels = grown;
        link->nchannels = n;
    }
    channel_state *cs = link->channels[ch];
    if (!cs) {
        cs = calloc(1, sizeof *cs);
        if (!cs) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        link->channels[ch] = cs;
    }
    cs->handler = h;
    cs->data = data;
    cs->assembling = ASSEMBLE_NONE;
    if (link_flush(link) < 0) {
        snprintf(err, errlen, "%s", link->error);
        return -1;
    }
    amqp_channel_open(rb_link_conn(link), ch);
    return rb_link_check_reply(link, ch, "channel.open", err, errlen);
}

int rb_link_declare_rpc_exchange(rb_link *link, amqp_channel_t ch, char *err, size_t errlen) {
    amqp_exchange_declare(rb_link_conn(link), ch, amqp_cstring_bytes(RB_RPC_EXCHANGE),
                          amqp_cstring_bytes(RB_RPC_EXCHANGE_TYPE), 0, 1, 0, 0, amqp_empty_table);
    return rb_link_check_reply(link, ch, "exchange.declare rpc", err, errlen);
}

int rb_link_consume_private_queue(rb_link *link, amqp_channel_t ch, const char *what, char *out,
                                  size_t outlen, char *err, size_t errlen) {
    char step[96];
    amqp_connection_state_t conn = rb_link_conn(link);
    amqp_queue_declare_ok_t *q = amqp_queue_declare(conn, ch, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    snprintf(step, sizeof step, "queue.declare (%s)", what);
    if (rb_link_check_reply(link, ch, step, err, errlen) < 0) return -1;
    snprintf(out, outlen, "%.*s", (int)q->queue.len, (char *)q->queue.bytes);
    amqp_basic_consume(conn, ch, q->queue, amqp_empty_bytes, 0, 1, 1, amqp_empty_table);
    snprintf(step, sizeof step, "basic.consume (%s)", what);
    return rb_link_check_reply(link, ch, step, err, errlen);
}

void rb_link_channel_bind(rb_link *link, amqp_channel_t ch, const rb_channel_handler *h, void *data) {
    channel_state *cs = channel_get(link, ch);
    if (!cs) return;
    cs->handler = h;
    cs->data = data;
}

static void channel_free(channel_state *cs) {
    if (!cs) return;
    rb_buf_free(&cs->body);
    free(cs->owed);
    free(cs);
}

void rb_link_channel_forget(rb_link *link, amqp_channel_t ch) {
    channel_state *cs = link ? channel_get(link, ch) : NULL;
    if (!cs) return;
    link->channels[ch] = NULL;
    channel_free(cs);
}

void rb_link_channel_close(rb_link *link, amqp_channel_t ch) {
    if (!link || !channel_get(link, ch)) return;
    rb_link_channel_forget(link, ch);
    amqp_channel_close_t close = {AMQP_REPLY_SUCCESS, amqp_cstring_bytes("done"), 0, 0};
    if (link->open) link_method(link, ch, AMQP_CHANNEL_CLOSE_METHOD, &close);
}

/* ---- acks ---- */

int rb_link_track_delivery(rb_link *link, amqp_channel_t ch, uint64_t tag) {
    channel_state *cs = channel_get(link, ch);
    if (!cs) return -1;
    if (cs->nowed == cs->capowed) {
        int cap = cs->capowed ? cs->capowed * 2 : 64;
        owed_ack *grown = realloc(cs->owed, (size_t)cap * sizeof *grown);
        if (!grown) return -1;
        cs->owed = grown;
        cs->capowed = cap;
    }
    cs->owed[cs->nowed++] = (owed_ack){tag, 0};
    return 0;
}

void rb_link_ack(rb_link *link, amqp_channel_t ch, uint64_t tag) {
    channel_state *cs = channel_get(link, ch);
    if (cs) {
        /* Tags are tracked in delivery order, so a binary search finds it. */
        int lo = 0, hi = cs->nowed - 1;
        while (lo <= hi) {
            int mid = (lo + hi) / 2;
            if (cs->owed[mid].tag == tag) {
                if (!cs->owed[mid].done) {
                    cs->owed[mid].done = 1;
                    cs->ndone++;
                }
                return;
            }
            if (cs->owed[mid].tag < tag)
                lo = mid + 1;
            else
                hi = mid - 1;
        }
    }
    if (link->open) link_ack(link, ch, tag, 0);
}

/* One basic.ack with `multiple` covers the done prefix; a done delivery
 * behind one still running is acked alone so that it is not held up. */
static void flush_acks(rb_link *link, amqp_channel_t ch, channel_state *cs) {
    int prefix = 0;
    while (prefix < cs->nowed && cs->owed[prefix].done) prefix++;
    if (prefix > 0) link_ack(link, ch, cs->owed[prefix - 1].tag, prefix > 1);
    int kept = 0;
    for (int i = prefix; i < cs->nowed; i++) {
        if (cs->owed[i].done)
            link_ack(link, ch, cs->owed[i].tag, 0);
        else
            cs->owed[kept++] = cs->owed[i];
    }
    cs->nowed = kept;
    cs->ndone = 0;
}

/* ---- read batching ----
 * A client with many calls in flight was woken by each write of the
 * broker: a wakeup per 7 calls at window 256, and 4 in 10 of them brought
 * publisher confirms alone, 21 bytes each (strace of bench/lua_client.lua),
 * each costing a context switch, a recv and often a send. While at least
 * BATCH_MIN_REPLIES deliveries are due, SO_RCVLOWAT asks the kernel to wake
 * the link only once the bytes of one in BATCH_SHARE of them have come,
 * counted at REPLY_MIN_BYTES each (a small reply takes about 150), and
 * batch_timer reads whatever has come BATCH_MS after the last read. The
 * trade-off: while many calls are due, a delivery may wait up to BATCH_MS
 * (2 on a millisecond clock) for the others of its batch; the Lua client's
 * CPU per call fell by a third, its wakeups from 5,000 to 950 per 30,000
 * calls. The threshold follows the flow: a wakeup that brought two
 * messages or more doubles it (from off, starts it at REPLY_MIN_BYTES);
 * the timer, finding it unfilled, halves it, and below REPLY_MIN_BYTES
 * turns it off. Replies that come one at a time (a slow service's, or a
 * quick call's beside many slow ones) so never wait for the timer, and a
 * link with calls out and nothing coming is not woken every BATCH_MS.
 * Plain TCP only: a TLS library may hold bytes the kernel does not count.
 * A blocking RPC on the connection first turns it off (unbatch_reads): its
 * short reply must wake it. */
#define BATCH_MIN_REPLIES 16
#define BATCH_SHARE 8
#define REPLY_MIN_BYTES 128
#define BATCH_MAX_BYTES 16384
#define BATCH_MS 2

void rb_link_expect_replies(rb_link *link, size_t n) {
    link->replies_due = n;
}

static void set_rcvlowat(rb_link *link, int bytes) {
    if (bytes == link->rcvlowat) return;
    /* On failure the kernel wakes as before: nothing is lost but the saving. */
    if (setsockopt(link->fd, SOL_SOCKET, SO_RCVLOWAT, &bytes, sizeof bytes) == 0) link->rcvlowat = bytes;
}

/* Bytes already waiting under the old threshold are not left unread: the
 * setsockopt that lowers it wakes epoll for them (Linux 4.18 and later;
 * Debian 10 has 4.19), so the timer can go. */
static void unbatch_reads(rb_link *link) {
    if (link->rcvlowat > 1) set_rcvlowat(link, 1);
    if (link->attached) rb_timer_stop(link->loop, &link->batch_timer);
}

/* The threshold for the deliveries due, a power of two so that it changes
 * (one setsockopt) only when their number doubles or halves. */
static int batch_bytes(size_t due) {
    size_t want = due / BATCH_SHARE * REPLY_MIN_BYTES, bytes = REPLY_MIN_BYTES;
    while (bytes * 2 <= want && bytes * 2 <= BATCH_MAX_BYTES) bytes *= 2;
    return (int)bytes;
}

/* (Re)arms the timer that reads what has come: without it nothing would
 * read what stays under the threshold. */
static void arm_batch_timer(rb_link *link) {
    if (rb_timer_start(link->loop, &link->batch_timer, BATCH_MS / 1000.0) < 0) unbatch_reads(link);
}

static void batch_reads(rb_link *link) {
    if (!link->gather || link->replies_due < BATCH_MIN_REPLIES || !link->batch_cap) {
        unbatch_reads(link);
        return;
    }
    int bytes = batch_bytes(link->replies_due);
    set_rcvlowat(link, bytes < link->batch_cap ? bytes : link->batch_cap);
    if (link->rcvlowat > 1 && link->batch_timer.heap_index < 0) arm_batch_timer(link);
}

/* After a read: the timer that reads what has come is due BATCH_MS after
 * it, and a wakeup that brought several messages lets the threshold grow. */
static void batch_after_read(rb_link *link, uint64_t messages) {
    if (link->woken && messages >= 2) {
        if (!link->batch_cap)
            link->batch_cap = REPLY_MIN_BYTES;
        else if (link->rcvlowat > 1 && link->batch_cap < BATCH_MAX_BYTES)
            link->batch_cap *= 2;
    }
    link->woken = 0;
    if (link->rcvlowat > 1) arm_batch_timer(link);
}

/* The flow did not fill the threshold in time: halve it, or stop. */
static void on_batch_tick(rb_loop *loop, void *data) {
    (void)loop;
    rb_link *link = data;
    link->batch_cap = link->rcvlowat > REPLY_MIN_BYTES ? link->rcvlowat / 2 : 0;
    link_pump(link);
}

static int link_before_sleep(rb_loop *loop, void *data) {
    (void)loop;
    rb_link *link = data;
    if (!link->open) return 0;
    for (int ch = 0; ch < link->nchannels; ch++) {
        channel_state *cs = link->channels[ch];
        if (cs && cs->ndone) flush_acks(link, (amqp_channel_t)ch, cs);
    }
    if (link->out.len && link_flush(link) < 0) return 0;
    batch_reads(link);
    /* A blocking RPC may have queued frames of other channels, or read more
     * bytes than it used: the socket will not signal those again. */
    if (amqp_frames_enqueued(link->conn) || amqp_data_in_buffer(link->conn)) {
        link_pump(link);
        return 1;
    }
    return 0;
}

/* ---- reading frames ---- */

static void deliver(rb_link *link, amqp_channel_t ch, channel_state *cs) {
    rb_message m = {0};
    m.channel = ch;
    m.delivery_tag = cs->delivery_tag;
    m.redelivered = cs->redelivered;
    m.reply_code = cs->reply_code;
    m.reply_text = cs->reply_text;
    m.body = cs->body.data ? cs->body.data : "";
    m.body_len = (size_t)cs->body_size; /* over max_body: its size only, and no bytes */
    m.reply_to = cs->reply_to;
    m.correlation_id = cs->correlation_id;
    m.expiration = cs->expiration;
    m.has_reply_to = cs->has_reply_to;
    m.has_correlation_id = cs->has_correlation_id;
    m.deadline_ms = cs->deadline_ms;
    m.traceparent = cs->traceparent;
    m.delivery_count = cs->delivery_count;
    m.timeout_text = cs->timeout_text;
    m.death_queue = cs->death_queue;
    m.death_reason = cs->death_reason;
    int kind = cs->assembling;
    cs->assembling = ASSEMBLE_NONE;
    link->delivered++;
    if (kind == ASSEMBLE_DELIVERY && cs->handler->on_delivery)
        cs->handler->on_delivery(link, cs->data, &m);
    else if (kind == ASSEMBLE_RETURN && cs->handler->on_return)
        cs->handler->on_return(link, cs->data, &m);
    /* Large bodies should not pin their buffer for the link's lifetime. */
    if (cs->body.cap > (1u << 20)) rb_buf_free(&cs->body);
}

static void start_message(channel_state *cs, int kind) {
    cs->assembling = kind;
    cs->have_header = 0;
    cs->body.len = 0;
    cs->reply_to[0] = cs->correlation_id[0] = cs->expiration[0] = '\0';
    cs->has_reply_to = cs->has_correlation_id = 0;
    cs->deadline_ms = cs->delivery_count = 0;
    cs->traceparent[0] = '\0';
    cs->timeout_text[0] = cs->death_queue[0] = cs->death_reason[0] = '\0';
    cs->reply_code = 0;
    cs->reply_text[0] = '\0';
}

int64_t rb_epoch_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t integer_of(const amqp_field_value_t *v) {
    switch (v->kind) {
    case AMQP_FIELD_KIND_I64: return v->value.i64;
    case AMQP_FIELD_KIND_U64: return (int64_t)v->value.u64;
    case AMQP_FIELD_KIND_I32: return v->value.i32;
    case AMQP_FIELD_KIND_U32: return v->value.u32;
    default: return 0; /* a header we do not understand tells us nothing */
    }
}

static int key_is(const amqp_table_entry_t *e, const char *key) {
    size_t len = strlen(key);
    return e->key.len == len && memcmp(e->key.bytes, key, len) == 0;
}

/* A string header into dst; other kinds leave it empty. */
static void copy_string_header(char *dst, size_t cap, const amqp_field_value_t *v) {
    if (v->kind == AMQP_FIELD_KIND_UTF8 || v->kind == AMQP_FIELD_KIND_BYTES)
        copy_bytes(dst, cap, v->value.bytes);
}

/* A traceparent header into dst, left empty when it is not a string or
 * too long to be one. */
static void copy_traceparent(char *dst, size_t cap, const amqp_field_value_t *v) {
    if ((v->kind == AMQP_FIELD_KIND_UTF8 || v->kind == AMQP_FIELD_KIND_BYTES) && v->value.bytes.len < cap)
        copy_bytes(dst, cap, v->value.bytes);
}

/* The headers the host reads: a caller's deadline, its traceparent, a
 * timeout answer's reason, and where the broker dead-lettered a request
 * (its first death: later ones would be the expired queue's own). */
static void read_headers(channel_state *cs, const amqp_table_t *headers) {
    for (int i = 0; i < headers->num_entries; i++) {
        const amqp_table_entry_t *e = &headers->entries[i];
        if (key_is(e, RB_DEADLINE_HEADER))
            cs->deadline_ms = integer_of(&e->value);
        else if (key_is(e, RB_TRACEPARENT_HEADER))
            copy_traceparent(cs->traceparent, sizeof cs->traceparent, &e->value);
        else if (key_is(e, RB_TIMEOUT_HEADER))
            copy_string_header(cs->timeout_text, sizeof cs->timeout_text, &e->value);
        else if (key_is(e, "x-delivery-count"))
            cs->delivery_count = integer_of(&e->value);
        else if (key_is(e, "x-first-death-queue"))
            copy_string_header(cs->death_queue, sizeof cs->death_queue, &e->value);
        else if (key_is(e, "x-first-death-reason"))
            copy_string_header(cs->death_reason, sizeof cs->death_reason, &e->value);
    }
}

static void on_header(rb_link *link, amqp_channel_t ch, channel_state *cs, amqp_frame_t *f) {
    amqp_basic_properties_t *p = f->payload.properties.decoded;
    cs->have_header = 1;
    cs->body_size = f->payload.properties.body_size;
    if (p->_flags & AMQP_BASIC_REPLY_TO_FLAG) {
        copy_bytes(cs->reply_to, sizeof cs->reply_to, p->reply_to);
        cs->has_reply_to = 1;
    }
    if (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) {
        copy_bytes(cs->correlation_id, sizeof cs->correlation_id, p->correlation_id);
        cs->has_correlation_id = 1;
    }
    if (p->_flags & AMQP_BASIC_EXPIRATION_FLAG)
        copy_bytes(cs->expiration, sizeof cs->expiration, p->expiration);
    if (p->_flags & AMQP_BASIC_HEADERS_FLAG) read_headers(cs, &p->headers);
    cs->received = 0;
    /* An oversize body is not stored: the receiver sees its size and
     * refuses it, so max_body bounds memory and not only what Lua sees. */
    if (cs->body_size <= link->max_body && rb_buf_reserve(&cs->body, (size_t)cs->body_size + 1) < 0) {
        link_lost(link, "out of memory for a message body");
        return;
    }
    if (cs->body_size == 0) deliver(link, ch, cs);
}

static void on_body(rb_link *link, amqp_channel_t ch, channel_state *cs, amqp_frame_t *f) {
    amqp_bytes_t frag = f->payload.body_fragment;
    if (cs->received + frag.len > cs->body_size) {
        link_lost(link, "broker sent more body than announced");
        return;
    }
    if (cs->body_size <= link->max_body) {
        memcpy(cs->body.data + cs->body.len, frag.bytes, frag.len);
        cs->body.len += frag.len;
    }
    cs->received += frag.len;
    if (cs->received == cs->body_size) deliver(link, ch, cs);
}

static void on_method(rb_link *link, amqp_channel_t ch, channel_state *cs, amqp_frame_t *f) {
    amqp_method_t *m = &f->payload.method;
    switch (m->id) {
    case AMQP_BASIC_DELIVER_METHOD: {
        amqp_basic_deliver_t *d = m->decoded;
        if (!cs) return;
        start_message(cs, ASSEMBLE_DELIVERY);
        cs->delivery_tag = d->delivery_tag;
        cs->redelivered = d->redelivered;
        break;
    }
    case AMQP_BASIC_RETURN_METHOD: {
        amqp_basic_return_t *r = m->decoded;
        if (!cs) return;
        start_message(cs, ASSEMBLE_RETURN);
        cs->reply_code = r->reply_code;
        copy_bytes(cs->reply_text, sizeof cs->reply_text, r->reply_text);
        break;
    }
    case AMQP_BASIC_ACK_METHOD: {
        amqp_basic_ack_t *a = m->decoded;
        if (cs && cs->handler->on_confirm)
            cs->handler->on_confirm(link, cs->data, a->delivery_tag, a->multiple, 0);
        break;
    }
    case AMQP_BASIC_NACK_METHOD: {
        amqp_basic_nack_t *n = m->decoded;
        if (cs && cs->handler->on_confirm)
            cs->handler->on_confirm(link, cs->data, n->delivery_tag, n->multiple, 1);
        break;
    }
    case AMQP_BASIC_CANCEL_METHOD:
        if (cs && cs->handler->on_closed)
            cs->handler->on_closed(link, cs->data, "the broker cancelled the consumer (queue deleted?)", 1);
        break;
    case AMQP_CHANNEL_CLOSE_METHOD: {
        amqp_channel_close_t *c = m->decoded;
        char why[300];
        copy_bytes(why, sizeof why, c->reply_text);
        amqp_channel_close_ok_t ok = {0};
        send_now(link, ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        /* Writing may have lost the link, and its owner forgotten the
         * channel meanwhile. */
        if (!link->open) break;
        cs = channel_get(link, ch);
        if (cs) {
            cs->nowed = cs->ndone = 0; /* the broker requeues what was unacked */
            if (cs->handler->on_closed) cs->handler->on_closed(link, cs->data, why, 0);
        }
        break;
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
        amqp_connection_close_t *c = m->decoded;
        char why[300];
        copy_bytes(why, sizeof why, c->reply_text);
        amqp_connection_close_ok_t ok = {0};
        send_now(link, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
        link_lost(link, why);
        break;
    }
    default: break; /* flow, blocked, unblocked: nothing to do */
    }
}

static void link_pump(rb_link *link) {
    if (!link->open || link->pumping) return;
    link->pumping = 1;
    link->last_read_ms = rb_now_ms();
    uint64_t delivered_before = link->delivered;
    struct timeval zero = {0, 0};
    int read_socket = 0;
    while (link->open && !link->close_requested) {
        /* Once the socket has been read and what it gave is used up, the
         * loop's (level-triggered) epoll says whether more has come: asking
         * rabbitmq-c would cost a recv() and a poll() that find nothing. Not
         * on TLS, whose library may hold bytes that epoll cannot see. */
        int buffered = amqp_data_in_buffer(link->conn) || amqp_frames_enqueued(link->conn);
        if (!buffered && read_socket && link->gather) break;
        read_socket |= !buffered;
        amqp_frame_t f;
        int st = amqp_simple_wait_frame_noblock(link->conn, &f, &zero);
        if (st == AMQP_STATUS_TIMEOUT) break;
        if (st != AMQP_STATUS_OK) {
            link_lost(link, amqp_error_string2(st));
            break;
        }
        channel_state *cs = channel_get(link, f.channel);
        if (f.frame_type == AMQP_FRAME_METHOD)
            on_method(link, f.channel, cs, &f);
        else if (!cs || cs->assembling == ASSEMBLE_NONE)
            continue; /* stray content */
        else if (f.frame_type == AMQP_FRAME_HEADER)
            on_header(link, f.channel, cs, &f);
        else if (f.frame_type == AMQP_FRAME_BODY && cs->have_header)
            on_body(link, f.channel, cs, &f);
        /* Everything of this frame is copied out by now. Recycling the
         * channel's pool per frame keeps it at a page or two; recycled once
         * per pump it grows to every frame the socket held (megabytes with
         * large bodies) and rabbitmq-c keeps those pages for good. */
        if (link->open) amqp_maybe_release_buffers_on_channel(link->conn, f.channel);
    }
    if (link->open) amqp_maybe_release_buffers(link->conn);
    /* The replies published meanwhile, then the acks of their requests
     * (never an ack before its reply), in one write. */
    for (int ch = 0; link->open && ch < link->nchannels; ch++) {
        channel_state *cs = link->channels[ch];
        if (cs && cs->ndone) flush_acks(link, (amqp_channel_t)ch, cs);
    }
    if (link->open && link->out.len) link_flush(link);
    if (link->open) batch_after_read(link, link->delivered - delivered_before);
    link->pumping = 0;
    if (link->close_requested) rb_link_close(link);
}

static void on_readable(rb_loop *loop, int fd, void *data, int mask) {
    (void)loop;
    (void)fd;
    (void)mask;
    rb_link *link = data;
    link->woken = 1;
    link_pump(link);
}

/* rabbitmq-c sends heartbeats, and notices missing ones, only while it is
 * asked for frames: an idle link must still ask now and then. */
static void on_heartbeat_tick(rb_loop *loop, void *data) {
    rb_link *link = data;
    /* Armed first: the pump may free a link closed from a handler (which
     * stops the timer), after which nothing here may touch it. */
    rb_timer_start(loop, &link->heartbeat_timer, link->heartbeat / 4.0);
    link_pump(link);
}

/* ---- open / close ---- */

static amqp_socket_t *tls_socket(amqp_connection_state_t conn, const rb_tls_options *tls, char *err,
                                 size_t errlen) {
    static const rb_tls_options defaults = {"", "", "", 1, 1};
    if (!tls) tls = &defaults;
    amqp_socket_t *sock = amqp_ssl_socket_new(conn);
    if (!sock) {
        snprintf(err, errlen, "cannot create a TLS socket");
        return NULL;
    }
    if (tls->ca_cert[0]) {
        if (amqp_ssl_socket_set_cacert(sock, tls->ca_cert) != AMQP_STATUS_OK) {
            snprintf(err, errlen, "cannot read the CA certificate %s", tls->ca_cert);
            return NULL;
        }
    } else if (tls->verify_peer) {
        /* No CA file named: trust what the system trusts. */
        SSL_CTX_set_default_verify_paths(amqp_ssl_socket_get_context(sock));
    }
    if (tls->cert[0] || tls->key[0]) {
        if (!tls->cert[0] || !tls->key[0]) {
            snprintf(err, errlen, "tls: a client certificate needs both cert and key");
            return NULL;
        }
        if (amqp_ssl_socket_set_key(sock, tls->cert, tls->key) != AMQP_STATUS_OK) {
            snprintf(err, errlen, "cannot use the client certificate %s with key %s", tls->cert, tls->key);
            return NULL;
        }
    }
    amqp_ssl_socket_set_verify_peer(sock, tls->verify_peer);
    amqp_ssl_socket_set_verify_hostname(sock, tls->verify_hostname);
    return sock;
}

static rb_link *login_one(const rb_link_options *opts, const char *one_url, char *err, size_t errlen);

/* Calls fn(url, i, arg) for each URL of a space-separated list, in order,
 * until fn returns nonzero. -> the number of URLs seen */
static int each_url(const char *list, int (*fn)(const char *url, int i, void *arg), void *arg) {
    char one[1024];
    size_t n = 0;
    int count = 0;
    for (const char *p = list;; p++) {
        if (*p && *p != ' ') {
            if (n < sizeof one - 1) one[n++] = *p;
            continue;
        }
        if (n > 0) {
            one[n] = '\0';
            n = 0;
            if (fn && fn(one, count, arg)) return count + 1;
            count++;
        }
        if (!*p) return count;
    }
}

int rb_link_url_count(const char *list) {
    return list ? each_url(list, NULL, NULL) : 1;
}

typedef struct {
    const rb_link_options *opts;
    int want;
    char *err;
    size_t errlen;
    rb_link *link;
} open_try;

static int try_url(const char *url, int i, void *arg) {
    open_try *t = arg;
    if (i != t->want) return 0;
    t->link = login_one(t->opts, url, t->err, t->errlen);
    if (t->link) t->link->url_index = i;
    return 1;
}

/* opts->url may name several brokers (a cluster's nodes), separated by
 * spaces: each is tried in turn from the one at opts->first (wrapping
 * round), and the first that accepts us wins. Starting at different nodes
 * is what spreads workers and clients over a cluster. */
static rb_link *link_login(const rb_link_options *opts, char *err, size_t errlen) {
    const char *list = opts->url ? opts->url : "amqp://guest:guest@localhost:5672/";
    int n = rb_link_url_count(list);
    if (n == 0) {
        snprintf(err, errlen, "no broker URL given");
        return NULL;
    }
    int first = opts->first % n < 0 ? opts->first % n + n : opts->first % n;
    for (int k = 0; k < n; k++) {
        open_try t = {opts, (first + k) % n, err, errlen, NULL};
        each_url(list, try_url, &t);
        if (t.link) return t.link;
        if (k + 1 < n) rb_log(RB_LOG_WARN, "%s; trying the next broker", err);
    }
    return NULL;
}

int rb_link_url_index(const rb_link *link) {
    return link ? link->url_index : -1;
}

static int hex_digit(char c) {
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

/* Percent-decodes s[0..n) into out; -1 on a bad escape, a NUL or no room. */
static int percent_decode(const char *s, size_t n, char *out, size_t cap) {
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int byte = (unsigned char)s[i];
        if (s[i] == '%') {
            int hi = i + 2 < n ? hex_digit(s[i + 1]) : -1, lo = i + 2 < n ? hex_digit(s[i + 2]) : -1;
            if (hi < 0 || lo < 0) return -1;
            byte = hi * 16 + lo;
            i += 2;
        }
        if (byte == 0 || o + 1 >= cap) return -1;
        out[o++] = (char)byte;
    }
    out[o] = '\0';
    return 0;
}

enum { HAS_USER = 1, HAS_PASSWORD = 2 };

/* rabbitmq-c's URL parser refuses percent-escapes of bytes >= 0x80, so the
 * user and password are decoded here, and cut from the URL before it parses
 * the rest. The userinfo ends at the authority's last '@', so an unencoded
 * '@' in a password works too. -> HAS_* bits, or -1 on a bad escape. */
static int take_credentials(char *url, char user[256], char password[256]) {
    char *auth = strstr(url, "://");
    if (!auth) return 0;
    auth += 3;
    char *end = auth + strcspn(auth, "/?#"), *at = NULL;
    for (char *p = auth; p < end; p++)
        if (*p == '@') at = p;
    if (!at) return 0;
    char *colon = memchr(auth, ':', (size_t)(at - auth));
    if (percent_decode(auth, (size_t)((colon ? colon : at) - auth), user, 256) < 0) return -1;
    if (colon && percent_decode(colon + 1, (size_t)(at - colon - 1), password, 256) < 0) return -1;
    memmove(auth, at + 1, strlen(at + 1) + 1);
    return HAS_USER | (colon ? HAS_PASSWORD : 0);
}

static rb_link *login_one(const rb_link_options *opts, const char *one_url, char *err, size_t errlen) {
    struct amqp_connection_info info;
    char *url = strdup(one_url), user[256], password[256];
    rb_link *link = calloc(1, sizeof *link);
    if (!url || !link) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    amqp_default_connection_info(&info);
    int credentials = take_credentials(url, user, password);
    if (credentials < 0 || amqp_parse_url(url, &info) != AMQP_STATUS_OK) {
        char masked[RB_MASKED_MAX(1024)];
        rb_mask_url(one_url, masked, sizeof masked);
        snprintf(err, errlen, "malformed broker URL '%s' (expected amqp://user:password@host:port/vhost%s)",
                 masked, credentials < 0 ? "; the user or password has a bad %-escape or is too long" : "");
        goto fail;
    }
    if (credentials & HAS_USER) info.user = user;
    if (credentials & HAS_PASSWORD) info.password = password;
    /* amqp://host/ names the default vhost, as every AMQP client takes it. */
    if (!info.vhost || !*info.vhost) info.vhost = "/";
    link->conn = amqp_new_connection();
    amqp_socket_t *sock =
        info.ssl ? tls_socket(link->conn, opts->tls, err, errlen) : amqp_tcp_socket_new(link->conn);
    if (!sock) {
        if (!info.ssl) snprintf(err, errlen, "cannot create a TCP socket");
        goto fail;
    }
    double t = opts->connect_timeout > 0 ? opts->connect_timeout : 10;
    struct timeval tv = {(time_t)t, (suseconds_t)((t - (double)(time_t)t) * 1e6)};
    amqp_set_handshake_timeout(link->conn, &tv);
    amqp_set_rpc_timeout(link->conn, &tv);
    int st = amqp_socket_open_noblock(sock, info.host, info.port, &tv);
    if (st != AMQP_STATUS_OK) {
        /* rabbitmq-c keeps no errno; a socket error at this point means
         * nothing accepted the connection there. */
        if (st == AMQP_STATUS_SOCKET_ERROR)
            snprintf(err, errlen,
                     "cannot connect to the broker at %s:%d: connection refused or unreachable "
                     "(is it running there? see --url or RABIBRIDGE_URL)",
                     info.host, info.port);
        else
            snprintf(err, errlen, "cannot connect to the broker at %s:%d: %s (see --url or RABIBRIDGE_URL)",
                     info.host, info.port, amqp_error_string2(st));
        goto fail;
    }
    /* consumer_cancel_notify: without it the broker cancels a consumer (its
     * queue deleted) silently, and a worker would never know it stopped
     * serving. rabbitmq-c merges these capabilities with its own. */
    amqp_table_entry_t capability;
    capability.key = amqp_cstring_bytes("consumer_cancel_notify");
    capability.value.kind = AMQP_FIELD_KIND_BOOLEAN;
    capability.value.value.boolean = 1;
    amqp_table_entry_t prop[2];
    prop[0].key = amqp_cstring_bytes("connection_name");
    prop[0].value.kind = AMQP_FIELD_KIND_UTF8;
    prop[0].value.value.bytes =
        amqp_cstring_bytes(opts->connection_name ? opts->connection_name : "rabibridge");
    prop[1].key = amqp_cstring_bytes("capabilities");
    prop[1].value.kind = AMQP_FIELD_KIND_TABLE;
    prop[1].value.value.table = (amqp_table_t){1, &capability};
    amqp_table_t props = {2, prop};
    amqp_rpc_reply_t r = amqp_login_with_properties(link->conn, info.vhost, 0, 131072, opts->heartbeat,
                                                    &props, AMQP_SASL_METHOD_PLAIN, info.user, info.password);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        char why[400];
        describe_reply(r, "login", why, sizeof why);
        snprintf(err, errlen, "cannot log in to %s:%d vhost '%s' as '%s': %s", info.host, info.port,
                 info.vhost, info.user, why);
        goto fail;
    }
    link->fd = amqp_get_sockfd(link->conn);
    link->max_body = (size_t)-1;
    link->heartbeat = amqp_get_heartbeat(link->conn);
    link->gather = !info.ssl;
    link->send_timeout_ms = (int)(t * 1000);
    free(url);
    return link;
fail:
    if (link && link->conn) amqp_destroy_connection(link->conn);
    free(link);
    free(url);
    return NULL;
}

/* Hands a logged-in link to its loop: from now on only the loop's thread
 * touches it. 0, or -1 with err set (the link is left unattached). */
static int link_attach(rb_link *link, rb_loop *loop, char *err, size_t errlen) {
    link->loop = loop;
    if (rb_loop_add_file(loop, link->fd, RB_READABLE, on_readable, link) < 0) {
        snprintf(err, errlen, "cannot watch the broker socket");
        return -1;
    }
    if (rb_loop_add_before_sleep(loop, link_before_sleep, link) < 0) {
        rb_loop_del_file(loop, link->fd);
        snprintf(err, errlen, "cannot watch the broker socket");
        return -1;
    }
    link->attached = 1;
    link->open = 1;
    link->last_read_ms = rb_now_ms();
    rb_timer_init(&link->heartbeat_timer, on_heartbeat_tick, link);
    rb_timer_init(&link->batch_timer, on_batch_tick, link);
    link->rcvlowat = 1;
    link->batch_cap = BATCH_MAX_BYTES;
    if (link->heartbeat > 0) rb_timer_start(loop, &link->heartbeat_timer, link->heartbeat / 4.0);
    return 0;
}

static void link_free(rb_link *link) {
    amqp_destroy_connection(link->conn);
    for (int ch = 0; ch < link->nchannels; ch++) channel_free(link->channels[ch]);
    free(link->channels);
    rb_buf_free(&link->out);
    free(link);
}

/* A link never attached (an opening given up, or whose set-up failed): it
 * says goodbye without waiting for the broker's answer, which a frozen
 * broker would never give, so that this never blocks whoever drops it. */
static void link_discard(rb_link *link) {
    amqp_connection_close_t close;
    memset(&close, 0, sizeof close);
    close.reply_code = AMQP_REPLY_SUCCESS;
    close.reply_text = amqp_cstring_bytes("closed before use");
    amqp_send_method(link->conn, 0, AMQP_CONNECTION_CLOSE_METHOD, &close);
    link_free(link);
}

void rb_link_close(rb_link *link) {
    if (!link) return;
    if (!link->attached) {
        link_discard(link);
        return;
    }
    if (link->pumping) {
        link->close_requested = 1;
        return;
    }
    rb_loop *loop = link->loop;
    rb_loop_del_before_sleep(loop, link_before_sleep, link);
    if (link->flush_deferred) rb_loop_cancel_deferred(loop, flush_deferred, link);
    /* Its owner is going: a last write that fails must not call back into
     * it (a client would arm a reconnection timer on itself as it is freed). */
    link->on_lost = NULL;
    if (link->open) {
        for (int ch = 0; ch < link->nchannels; ch++) {
            channel_state *cs = link->channels[ch];
            if (cs && cs->ndone) flush_acks(link, (amqp_channel_t)ch, cs);
        }
        link_flush(link);
    }
    if (link->open) {
        unbatch_reads(link); /* the close-ok is short */
        rb_loop_del_file(loop, link->fd);
        rb_timer_stop(loop, &link->heartbeat_timer);
        link->open = 0;
        amqp_connection_close(link->conn, AMQP_REPLY_SUCCESS);
    }
    link_free(link);
}

/* ---- opening off the loop ----
 *
 * The TCP (and TLS) open, the login and the set-up that needs no loop run
 * on a short-lived thread of their own, so that a broker that accepts the
 * connection and then answers nothing (a frozen node) costs its opener the
 * wait and never the loop. Until the result is handed over, the link and
 * its rabbitmq-c state belong to that thread alone; the handover is a pipe
 * the loop watches. The opening is shared by two references, the thread's
 * and the loop side's, and the last one dropped frees it and whatever
 * result nobody took. */

struct rb_link_opening {
    atomic_int refs;
    atomic_int finished; /* the thread's result is written (release/acquire) */
    int wake[2];         /* the thread writes one byte to wake[1] when finished */
    int watched;         /* wake[0] is a file event of loop (loop side only) */
    rb_loop *loop;
    /* what the thread reads: copies, since the opener may go first */
    char url[1024], name[128];
    rb_tls_options tls;
    int has_tls, heartbeat, first;
    double connect_timeout;
    rb_link_setup_fn *setup;
    /* what the thread writes */
    rb_link *link;
    char out[256], err[600];
    /* the loop side's */
    rb_link_opened_fn *done;
    void *data;
};

/* Each side closes its own end of the pipe before it lets go (the thread
 * wake[1] once written, the loop side wake[0] once unwatched), never the
 * other's: a descriptor closed late by the other thread could by then be
 * someone else's under the same number. */
static void opening_release(rb_link_opening *o) {
    if (atomic_fetch_sub_explicit(&o->refs, 1, memory_order_acq_rel) != 1) return;
    if (o->link) link_discard(o->link); /* nobody took it */
    free(o);
}

/* The loop side lets go: its end of the pipe first. */
static void opening_drop(rb_link_opening *o) {
    if (o->watched) rb_loop_del_file(o->loop, o->wake[0]);
    o->watched = 0;
    close(o->wake[0]);
    opening_release(o);
}

static void *opening_main(void *arg) {
    rb_link_opening *o = arg;
    rb_link_options opts = {
        NULL, o->url, o->heartbeat, o->connect_timeout, o->name, o->has_tls ? &o->tls : NULL, o->first};
    rb_link *link = link_login(&opts, o->err, sizeof o->err);
    if (link && o->setup && o->setup(link, o->out, sizeof o->out, o->err, sizeof o->err) < 0) {
        link_discard(link);
        link = NULL;
    }
    o->link = link;
    atomic_store_explicit(&o->finished, 1, memory_order_release);
    /* The loop side may have closed its end already (an abandoned
     * opening): EPIPE then, and the SIGPIPE stays blocked here. */
    char one = 1;
    while (write(o->wake[1], &one, 1) < 0 && errno == EINTR) {
    }
    close(o->wake[1]);
    opening_release(o);
    return NULL;
}

static void on_opened(rb_loop *loop, int fd, void *data, int mask) {
    (void)mask;
    rb_link_opening *o = data;
    char byte;
    ssize_t n = read(fd, &byte, 1);
    (void)n;
    if (!atomic_load_explicit(&o->finished, memory_order_acquire)) return;
    rb_link *link = o->link;
    o->link = NULL;
    if (link && link_attach(link, loop, o->err, sizeof o->err) < 0) {
        link_discard(link);
        link = NULL;
    }
    /* done gets the opening's last words; the opening itself goes first,
     * so that whatever done does (even free its owner) cannot meet it. */
    char out[sizeof o->out], err[sizeof o->err];
    memcpy(out, o->out, sizeof out);
    memcpy(err, o->err, sizeof err);
    rb_link_opened_fn *done = o->done;
    void *done_data = o->data;
    opening_drop(o);
    done(done_data, link, link ? out : NULL, link ? NULL : err);
}

/* Starts a thread with every signal blocked: the process's handlers (stop
 * signals, Ctrl-C) must run on the loop's thread, whose poll they wake. */
static int start_thread(void *(*fn)(void *), void *arg) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    int rc = pthread_attr_init(&attr);
    if (rc == 0) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_t t;
        rc = pthread_create(&t, &attr, fn, arg);
        pthread_attr_destroy(&attr);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

rb_link_opening *rb_link_open_start(const rb_link_options *opts, rb_link_setup_fn *setup,
                                    rb_link_opened_fn *done, void *data, char *err, size_t errlen) {
    rb_link_opening *o = calloc(1, sizeof *o);
    if (!o) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    snprintf(o->url, sizeof o->url, "%s", opts->url ? opts->url : "amqp://guest:guest@localhost:5672/");
    snprintf(o->name, sizeof o->name, "%s", opts->connection_name ? opts->connection_name : "rabibridge");
    if (opts->tls) o->tls = *opts->tls;
    o->has_tls = opts->tls != NULL;
    o->heartbeat = opts->heartbeat;
    o->connect_timeout = opts->connect_timeout;
    o->first = opts->first;
    o->setup = setup;
    o->loop = opts->loop;
    o->done = done;
    o->data = data;
    if (pipe2(o->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
        snprintf(err, errlen, "cannot open a connection: %s", strerror(errno));
        free(o);
        return NULL;
    }
    if (rb_loop_add_file(o->loop, o->wake[0], RB_READABLE, on_opened, o) < 0) {
        snprintf(err, errlen, "cannot open a connection: the loop cannot watch it");
        goto fail;
    }
    o->watched = 1;
    atomic_init(&o->refs, 2);
    atomic_init(&o->finished, 0);
    int rc = start_thread(opening_main, o);
    if (rc != 0) {
        snprintf(err, errlen, "cannot open a connection: no thread for it (%s)", strerror(rc));
        rb_loop_del_file(o->loop, o->wake[0]);
        goto fail;
    }
    return o;
fail:
    close(o->wake[0]);
    close(o->wake[1]);
    free(o);
    return NULL;
}

void rb_link_open_abandon(rb_link_opening *o) {
    if (o) opening_drop(o);
}

void rb_link_requeue(rb_link *link, amqp_channel_t ch, uint64_t tag) {
    amqp_basic_reject_t reject = {tag, 1};
    if (link->open) link_method(link, ch, AMQP_BASIC_REJECT_METHOD, &reject);
}

static int flush_deferred(rb_loop *loop, void *data) {
    (void)loop;
    rb_link *link = data;
    link->flush_deferred = 0;
    if (link->open && link->out.len) link_flush(link);
    return 0;
}

/* What out holds goes at the end of the loop's step, when it runs one (the
 * requests of the tasks it resumes), else now. */
static int defer_flush(rb_link *link) {
    if (link->out.len >= GATHER_FLUSH_AT || !rb_loop_in_step(link->loop)) return link_flush(link);
    if (link->flush_deferred) return 0;
    if (rb_loop_defer(link->loop, flush_deferred, link) < 0) return link_flush(link);
    link->flush_deferred = 1;
    return 0;
}

/* basic.publish, its header and its body into out; written at once when
 * out has grown large. */
static int gather_publish(rb_link *link, amqp_channel_t ch, const char *exchange, const char *routing_key,
                          int mandatory, const amqp_basic_properties_t *props, const void *body, size_t len) {
    amqp_basic_publish_t m = {0};
    m.exchange = amqp_cstring_bytes(exchange);
    m.routing_key = amqp_cstring_bytes(routing_key);
    m.mandatory = (amqp_boolean_t)(mandatory != 0);
    if (gather_method(link, ch, AMQP_BASIC_PUBLISH_METHOD, &m) < 0 ||
        gather_header(link, ch, props, len) < 0 || gather_body(link, ch, body, len) < 0)
        return -1;
    if (link->pumping && link->out.len < GATHER_FLUSH_AT) return 0; /* written at the pump's end */
    return defer_flush(link);
}

int rb_link_publish(rb_link *link, amqp_channel_t ch, const char *exchange, const char *routing_key,
                    int mandatory, const amqp_basic_properties_t *props, const void *body, size_t len) {
    if (!link->open) return -1;
    if (link->gather && len <= GATHER_BODY_MAX)
        return gather_publish(link, ch, exchange, routing_key, mandatory, props, body, len);
    if (link_flush(link) < 0) return -1;
    amqp_bytes_t b = {len, (void *)body};
    int st = amqp_basic_publish(link->conn, ch, amqp_cstring_bytes(exchange), amqp_cstring_bytes(routing_key),
                                mandatory, 0, props, b);
    if (st != AMQP_STATUS_OK) {
        link_lost(link, amqp_error_string2(st));
        return -1;
    }
    return 0;
}

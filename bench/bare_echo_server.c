/*
 * bare_echo_server: the reference ceiling for `make bench`.
 *
 *   bare_echo_server URL NAME [FETCH]
 *
 * Serves one function NAME exactly as a RabiBridge server does on the wire
 * (design.md section 4), with nothing between rabbitmq-c and the socket: no
 * event loop, no Lua, no JSON library. Whatever our host costs on top of this
 * is the price of being a framework.
 *
 *   - exchange `rpc` (direct, durable); queue `rpc_async_NAME` (durable,
 *     auto-delete, x-overflow=reject-publish) bound with key `async_NAME`;
 *   - basic.qos(prefetch = FETCH, default 256), manual acks;
 *   - for each request `[args, kwargs]` it publishes `[0, args[0]]` to the
 *     default exchange with routing key = reply_to and the same
 *     correlation_id, then acks it.
 *
 * Acks are sent with `multiple` once the input is drained or a quarter of the
 * prefetch window is owed: one ack frame per burst instead of one per
 * request, the cheapest correct scheme (our host acks the same way).
 *
 * SIGTERM / SIGINT: acks what was answered, closes the channel and the
 * connection, exits 0.
 */
#define _POSIX_C_SOURCE 200809L

#include <amqp.h>
#include <amqp_tcp_socket.h>

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>

#define PROGRAM_NAME "bare_echo_server"
#include "common.h"

#define CHANNEL 1

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}



/*
 * Length of the JSON value starting at s[0] (within n bytes), or 0 if it
 * does not end inside the buffer. Only brackets and strings matter: a value
 * ends at the first ',' or closing bracket at depth 0 outside a string. This
 * is all the parsing an echo needs, and no more than any server must do.
 */
static size_t json_value_len(const char *s, size_t n)
{
    size_t i = 0;
    int depth = 0, in_string = 0;
    for (; i < n; i++) {
        char c = s[i];
        if (in_string) {
            if (c == '\\')
                i++; /* skip the escaped character, e.g. \" */
            else if (c == '"')
                in_string = 0;
        } else if (c == '"') {
            in_string = 1;
        } else if (c == '[' || c == '{') {
            depth++;
        } else if (c == ']' || c == '}') {
            if (depth == 0) return i;
            depth--;
        } else if (c == ',' && depth == 0) {
            return i;
        }
    }
    return 0;
}

/*
 * Writes the reply to `[args, kwargs]` into *out (grown as needed):
 * `[0,args[0]]`, or `[1,"..."]` when the body is not that shape (a zstd
 * compressed body included: the bench client never sends one).
 */
static amqp_bytes_t make_reply(amqp_bytes_t body, char **out, size_t *cap)
{
    static const char bad[] = "[1,\"bare_echo_server: expected an uncompressed [[X,...],{...}] body\"]";
    const char *s = body.bytes;
    size_t n = body.len, start, len;

    /* Skip the two opening brackets (and any blanks a foreign client adds). */
    if (n < 4 || s[0] != '[') goto bad;
    start = 1;
    while (start < n && (s[start] == ' ' || s[start] == '\t' || s[start] == '\n' || s[start] == '\r')) start++;
    if (start >= n || s[start] != '[') goto bad;
    start++;
    while (start < n && (s[start] == ' ' || s[start] == '\t' || s[start] == '\n' || s[start] == '\r')) start++;
    len = json_value_len(s + start, n - start);
    while (len > 0 && (s[start + len - 1] == ' ' || s[start + len - 1] == '\n')) len--;
    if (len == 0) goto bad; /* empty args (no first element) or truncated */

    if (*cap < len + 4) {
        *cap = len + 4 > 2 * *cap ? len + 4 : 2 * *cap;
        *out = realloc(*out, *cap);
        if (!*out) die("out of memory", NULL);
    }
    memcpy(*out, "[0,", 3);
    memcpy(*out + 3, s + start, len);
    (*out)[3 + len] = ']';
    return (amqp_bytes_t){.len = len + 4, .bytes = *out};

bad:
    return (amqp_bytes_t){.len = sizeof bad - 1, .bytes = (void *)bad};
}

/* Declares NAME's queue, binds it and consumes from it on CHANNEL. */
static void serve_queue(amqp_connection_state_t conn, const char *name, long fetch)
{
    char queue[256], key[256];
    snprintf(queue, sizeof queue, "rpc_async_%s", name);
    snprintf(key, sizeof key, "async_%s", name);
    amqp_table_entry_t arg = {.key = amqp_cstring_bytes("x-overflow"),
                              .value = {.kind = AMQP_FIELD_KIND_UTF8,
                                        .value.bytes = amqp_cstring_bytes("reject-publish")}};
    amqp_table_t args = {.num_entries = 1, .entries = &arg};
    /* passive 0, durable 1, exclusive 0, auto_delete 1 */
    amqp_queue_declare(conn, CHANNEL, amqp_cstring_bytes(queue), 0, 1, 0, 1, args);
    check_reply(amqp_get_rpc_reply(conn), "queue.declare");
    amqp_queue_bind(conn, CHANNEL, amqp_cstring_bytes(queue), amqp_cstring_bytes("rpc"), amqp_cstring_bytes(key),
                    amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "queue.bind");
    /* no_local 0, no_ack 0 (manual acks), exclusive 0 */
    amqp_basic_consume(conn, CHANNEL, amqp_cstring_bytes(queue), amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "basic.consume");
    fprintf(stderr, "bare_echo_server: serving %s (queue %s, prefetch %ld)\n", name, queue, fetch);
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: bare_echo_server URL NAME[,NAME...] [FETCH]\n"
                        "  serves NAME (queue rpc_async_NAME) as an echo: [[X],{}] -> [0,X]\n"
                        "  (several names: one consumer each, all on one channel)\n");
        return 2;
    }
    const char *name = argv[2];
    long fetch = argc == 4 ? strtol(argv[3], NULL, 10) : 256;
    if (fetch < 1 || fetch > 65535) die("FETCH must be in 1..65535", argv[3]);

    /* amqp_parse_url writes into its argument and points into it. */
    char *url = strdup(argv[1]);
    struct amqp_connection_info ci;
    amqp_default_connection_info(&ci);
    if (!url || amqp_parse_url(url, &ci) != AMQP_STATUS_OK) die("cannot parse URL", argv[1]);
    if (ci.ssl) die("amqps:// is not supported by the baseline", argv[1]);
    /* amqp://host/ names the default vhost, as every AMQP client (and our
     * host) takes it; rabbitmq-c alone would ask for the vhost "". */
    if (!ci.vhost || !*ci.vhost) ci.vhost = "/";


    /* No SA_RESTART: a signal should interrupt a blocking wait. rabbitmq-c
     * retries poll() on EINTR, so the loop below also wakes every 100 ms to
     * look at the flag. */
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *sock = amqp_tcp_socket_new(conn);
    if (!sock) die("cannot create socket", NULL);
    int rc = amqp_socket_open(sock, ci.host, ci.port);
    if (rc != AMQP_STATUS_OK) die("cannot connect", amqp_error_string2(rc));
    /* frame_max 128 KiB is rabbitmq-c's and RabbitMQ's usual value;
     * no heartbeats: the loop does not service them while blocked. */
    /* consumer_cancel_notify: without it the broker drops our consumer in
     * silence when the queue is deleted, and we would wait forever. */
    amqp_table_entry_t cap = {.key = amqp_cstring_bytes("consumer_cancel_notify"),
                              .value = {.kind = AMQP_FIELD_KIND_BOOLEAN, .value.boolean = 1}};
    amqp_table_entry_t prop = {.key = amqp_cstring_bytes("capabilities"),
                               .value = {.kind = AMQP_FIELD_KIND_TABLE, .value.table = {1, &cap}}};
    amqp_table_t client_props = {.num_entries = 1, .entries = &prop};
    check_reply(amqp_login_with_properties(conn, ci.vhost, 0, 131072, 0, &client_props, AMQP_SASL_METHOD_PLAIN,
                                           ci.user, ci.password),
                "login");
    amqp_channel_open(conn, CHANNEL);
    check_reply(amqp_get_rpc_reply(conn), "channel.open");

    amqp_exchange_declare(conn, CHANNEL, amqp_cstring_bytes("rpc"), amqp_cstring_bytes("direct"), 0, 1, 0, 0,
                          amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "exchange.declare rpc");

    amqp_basic_qos(conn, CHANNEL, 0, (uint16_t)fetch, 0);
    check_reply(amqp_get_rpc_reply(conn), "basic.qos");
    /* basic.qos without `global`: FETCH per consumer, as our host's
     * channel per function gets FETCH per function. */
    char *names = strdup(name);
    if (!names) die("out of memory", NULL);
    for (char *save = NULL, *one = strtok_r(names, ",", &save); one; one = strtok_r(NULL, ",", &save))
        serve_queue(conn, one, fetch);
    free(names);

    char *reply = NULL;
    size_t reply_cap = 0;
    uint64_t last_tag = 0, acked_tag = 0;      /* replied up to / acked up to */
    uint64_t ack_batch = (uint64_t)(fetch / 4 > 0 ? fetch / 4 : 1);
    unsigned long served = 0;
    int status = 0;

    while (!stop_requested) {
        /* Before we might block, or once enough acks are owed: ack all
         * answered requests at once. The broker holds back deliveries
         * beyond the prefetch window until we do. */
        if (last_tag > acked_tag &&
            (last_tag - acked_tag >= ack_batch || (!amqp_data_in_buffer(conn) && !amqp_frames_enqueued(conn)))) {
            amqp_basic_ack(conn, CHANNEL, last_tag, 1);
            acked_tag = last_tag;
        }
        amqp_maybe_release_buffers(conn);

        struct timeval tv = {.tv_sec = 0, .tv_usec = 100000};
        amqp_envelope_t env;
        amqp_rpc_reply_t r = amqp_consume_message(conn, &env, &tv, 0);

        if (r.reply_type == AMQP_RESPONSE_NORMAL) {
            amqp_basic_properties_t *in = &env.message.properties;
            amqp_bytes_t out = make_reply(env.message.body, &reply, &reply_cap);
            if (in->_flags & AMQP_BASIC_REPLY_TO_FLAG) {
                amqp_basic_properties_t props = {0};
                if (in->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) {
                    props._flags = AMQP_BASIC_CORRELATION_ID_FLAG;
                    props.correlation_id = in->correlation_id;
                }
                /* Default exchange, not mandatory: a caller that went away
                 * simply loses its reply, as with any RPC server. */
                rc = amqp_basic_publish(conn, CHANNEL, amqp_empty_bytes, in->reply_to, 0, 0, &props, out);
                if (rc != AMQP_STATUS_OK) {
                    fprintf(stderr, "bare_echo_server: publish: %s\n", amqp_error_string2(rc));
                    status = 1;
                    amqp_destroy_envelope(&env);
                    break;
                }
            }
            last_tag = env.delivery_tag;
            served++;
            amqp_destroy_envelope(&env);
            continue;
        }

        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_TIMEOUT) continue;

        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
            /* The next frame is not a delivery. For a consumer that is a
             * channel/connection close or a basic.cancel (queue deleted):
             * nothing to serve any more. */
            amqp_frame_t frame;
            rc = amqp_simple_wait_frame(conn, &frame);
            if (rc != AMQP_STATUS_OK) {
                fprintf(stderr, "bare_echo_server: %s\n", amqp_error_string2(rc));
                status = 1;
                break;
            }
            if (frame.frame_type != AMQP_FRAME_METHOD) continue;
            switch (frame.payload.method.id) {
            case AMQP_CHANNEL_CLOSE_METHOD: {
                amqp_channel_close_t *m = frame.payload.method.decoded;
                fprintf(stderr, "bare_echo_server: channel closed by broker: %u %.*s\n", m->reply_code,
                        (int)m->reply_text.len, (const char *)m->reply_text.bytes);
                amqp_channel_close_ok_t ok = {0};
                amqp_send_method(conn, CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
                status = 1;
                goto close_connection;
            }
            case AMQP_CONNECTION_CLOSE_METHOD: {
                amqp_connection_close_t *m = frame.payload.method.decoded;
                fprintf(stderr, "bare_echo_server: connection closed by broker: %u %.*s\n", m->reply_code,
                        (int)m->reply_text.len, (const char *)m->reply_text.bytes);
                amqp_connection_close_ok_t ok = {0};
                amqp_send_method(conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
                status = 1;
                goto gone;
            }
            case AMQP_BASIC_CANCEL_METHOD:
                fprintf(stderr, "bare_echo_server: consumer cancelled by broker (queue deleted?)\n");
                status = 1;
                goto out;
            default:
                continue; /* nothing else concerns a plain consumer */
            }
        }

        fprintf(stderr, "bare_echo_server: connection lost\n");
        status = 1;
        goto gone;
    }

out:
    /* Requests answered but not yet acked: ack them, or the broker would
     * deliver them again to another server. Unanswered ones are requeued. */
    if (last_tag > acked_tag) amqp_basic_ack(conn, CHANNEL, last_tag, 1);
    amqp_channel_close(conn, CHANNEL, AMQP_REPLY_SUCCESS);
close_connection:
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
gone:
    amqp_destroy_connection(conn);
    /* Our own CPU time, for comparing what a server costs per call. */
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    fprintf(stderr, "bare_echo_server: served %lu requests, cpu %.2f s\n", served,
            (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
    free(reply);
    free(url);
    return status;
}

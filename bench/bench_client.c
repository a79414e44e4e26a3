/*
 * bench_client: the pipelined RPC client of `make bench`.
 *
 *   bench_client URL NAME --calls N --window W [--payload BYTES] [--json OUT]
 *
 * Calls function NAME (ftype async) N times exactly as a RabiBridge client
 * does on the wire (design.md section 4), keeping W calls in flight:
 *
 *   - one channel in publisher-confirm mode; a server-named, exclusive reply
 *     queue consumed without acks;
 *   - each request is published to exchange `rpc`, routing key `async_NAME`,
 *     mandatory, with correlation_id (decimal) and reply_to; its body is
 *     `[["<BYTES x's>"],{}]`, never compressed (servers only decompress
 *     bodies that start with the zstd magic);
 *   - a call completes when the reply with its correlation_id arrives; a
 *     broker nack (queue full), a basic.return (no route) or a reply whose
 *     err_code is not 0 makes it a failed call.
 *
 * It serves the bare rabbitmq-c server (bench/bare_echo_server) and our host
 * alike, so the two figures differ only by the server.
 *
 * Measured: wall time, calls/s, latency per call from publish to reply
 * (p50, p99), CPU time of this process. A warm-up of min(N/10, 1000) calls
 * runs first and is not counted.
 */
#define _POSIX_C_SOURCE 200809L

#include <amqp.h>
#include <amqp_tcp_socket.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <time.h>

#define PROGRAM_NAME "bench_client"
#include "common.h"

#define CHANNEL 1
#define STALL_SECONDS 10 /* no frame at all for this long: give up */

/* Per-call state, indexed by call number = correlation id = publish
 * sequence number - 1 (every publish on the channel is a call, in order). */
enum { IDLE, IN_FLIGHT, DONE };
#define CONFIRMED 0x80 /* or'ed into the state: the broker acked the publish */

static uint8_t *state;
static uint64_t *sent_ns;    /* monotonic time of the publish */
static double *latency_us;   /* per measured call, in completion order */
static size_t total_calls;   /* warm-up + measured */
static size_t in_flight, completed, failed, n_latency, compressed;
static size_t measure_from;  /* first call whose latency counts */
static uint64_t unconfirmed; /* lowest publish tag not yet confirmed */

static amqp_connection_state_t conn;
static char reply_queue[256];



static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* Ends call `id` (ok or not); later news about it (a confirm after the
 * reply, a reply after a nack) finds it no longer in flight and is ignored. */
static void finish(size_t id, int ok)
{
    if (id >= total_calls || (state[id] & ~CONFIRMED) != IN_FLIGHT) return;
    state[id] = (uint8_t)((state[id] & CONFIRMED) | DONE);
    in_flight--;
    completed++;
    if (!ok) {
        failed++;
    } else if (id >= measure_from) {
        latency_us[n_latency++] = (double)(now_ns() - sent_ns[id]) / 1e3;
    }
}

/* The call a correlation id names, or SIZE_MAX when it names none of ours. */
static size_t call_of(const amqp_bytes_t *cid)
{
    char buf[24];
    if (cid->len == 0 || cid->len >= sizeof buf) return SIZE_MAX;
    memcpy(buf, cid->bytes, cid->len);
    buf[cid->len] = 0;
    char *end;
    unsigned long long v = strtoull(buf, &end, 10);
    return *end ? SIZE_MAX : (size_t)v;
}

/* A reply `[err_code, result]`: ok when err_code is 0. A zstd-compressed
 * reply (a server compresses long ones) cannot be read without libzstd; it
 * is counted as ok and reported, so that the figure is not silently wrong. */
static int reply_ok(amqp_bytes_t body)
{
    const unsigned char *s = body.bytes;
    size_t i = 0, n = body.len;
    if (n >= 4 && s[0] == 0x28 && s[1] == 0xB5 && s[2] == 0x2F && s[3] == 0xFD) {
        compressed++;
        return 1;
    }
    while (i < n && (s[i] == ' ' || s[i] == '\n')) i++;
    if (i >= n || s[i++] != '[') return 0;
    while (i < n && s[i] == ' ') i++;
    if (i >= n || s[i++] != '0') return 0;
    while (i < n && s[i] == ' ') i++;
    return i < n && s[i] == ',';
}

/* Publisher confirm for publish tag `tag` (1-based), `multiple` covering every
 * unconfirmed tag up to it. A nack fails the calls it covers. */
static void on_confirm(uint64_t tag, int multiple, int nack)
{
    uint64_t lo = multiple ? unconfirmed : tag;
    for (uint64_t t = lo; t <= tag && t - 1 < total_calls; t++) {
        if (state[t - 1] & CONFIRMED) continue;
        state[t - 1] |= CONFIRMED;
        if (nack) finish((size_t)(t - 1), 0);
    }
    while (unconfirmed - 1 < total_calls && (state[unconfirmed - 1] & CONFIRMED)) unconfirmed++;
}

static void publish(size_t id, amqp_bytes_t routing_key, amqp_bytes_t body)
{
    char cid[24];
    snprintf(cid, sizeof cid, "%zu", id);
    amqp_basic_properties_t props = {0};
    props._flags = AMQP_BASIC_CORRELATION_ID_FLAG | AMQP_BASIC_REPLY_TO_FLAG;
    props.correlation_id = amqp_cstring_bytes(cid);
    props.reply_to = amqp_cstring_bytes(reply_queue);
    state[id] = IN_FLIGHT;
    in_flight++;
    sent_ns[id] = now_ns();
    /* mandatory 1: an unroutable request (no such function) comes back as
     * basic.return instead of vanishing. */
    int rc = amqp_basic_publish(conn, CHANNEL, amqp_cstring_bytes("rpc"), routing_key, 1, 0, &props, body);
    if (rc != AMQP_STATUS_OK) die("publish", amqp_error_string2(rc));
}

/* A frame that is not a delivery: confirm, return, or the channel going. */
static void on_frame(const amqp_frame_t *frame)
{
    if (frame->frame_type != AMQP_FRAME_METHOD) return;
    switch (frame->payload.method.id) {
    case AMQP_BASIC_ACK_METHOD: {
        amqp_basic_ack_t *m = frame->payload.method.decoded;
        on_confirm(m->delivery_tag, m->multiple, 0);
        break;
    }
    case AMQP_BASIC_NACK_METHOD: {
        amqp_basic_nack_t *m = frame->payload.method.decoded;
        on_confirm(m->delivery_tag, m->multiple, 1);
        break;
    }
    case AMQP_BASIC_RETURN_METHOD: {
        /* The returned request follows as header + body; its
         * correlation_id names the call. The broker confirms it after. */
        amqp_message_t msg;
        amqp_rpc_reply_t r = amqp_read_message(conn, CHANNEL, &msg, 0);
        check_reply(r, "reading a returned message");
        if (msg.properties._flags & AMQP_BASIC_CORRELATION_ID_FLAG) finish(call_of(&msg.properties.correlation_id), 0);
        amqp_destroy_message(&msg);
        break;
    }
    case AMQP_CHANNEL_CLOSE_METHOD: {
        amqp_channel_close_t *m = frame->payload.method.decoded;
        fprintf(stderr, "bench_client: channel closed by broker: %u %.*s\n", m->reply_code, (int)m->reply_text.len,
                (const char *)m->reply_text.bytes);
        exit(1);
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
        amqp_connection_close_t *m = frame->payload.method.decoded;
        fprintf(stderr, "bench_client: connection closed by broker: %u %.*s\n", m->reply_code,
                (int)m->reply_text.len, (const char *)m->reply_text.bytes);
        exit(1);
    }
    default:
        break;
    }
}

/* Runs calls [first, first + count) keeping `window` in flight, until all
 * of them are complete. */
static void run_calls(size_t first, size_t count, size_t window, amqp_bytes_t routing_key, amqp_bytes_t body)
{
    size_t next = first, end = first + count, done_before = completed;
    uint64_t last_progress = now_ns();

    while (completed - done_before < count) {
        while (in_flight < window && next < end) publish(next++, routing_key, body);

        amqp_maybe_release_buffers(conn);
        struct timeval tv = {.tv_sec = 1, .tv_usec = 0};
        amqp_envelope_t env;
        amqp_rpc_reply_t r = amqp_consume_message(conn, &env, &tv, 0);

        if (r.reply_type == AMQP_RESPONSE_NORMAL) {
            amqp_basic_properties_t *p = &env.message.properties;
            if (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG)
                finish(call_of(&p->correlation_id), reply_ok(env.message.body));
            amqp_destroy_envelope(&env);
            last_progress = now_ns();
        } else if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
            amqp_frame_t frame;
            int rc = amqp_simple_wait_frame(conn, &frame);
            if (rc != AMQP_STATUS_OK) die("connection lost", amqp_error_string2(rc));
            on_frame(&frame);
            last_progress = now_ns();
        } else if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_TIMEOUT) {
            if (now_ns() - last_progress > (uint64_t)STALL_SECONDS * 1000000000u) {
                fprintf(stderr, "bench_client: no reply for %d s with %zu calls in flight; is a server running?\n",
                        STALL_SECONDS, in_flight);
                exit(1);
            }
        } else {
            check_reply(r, "consume");
        }
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted v[0..n). */
static double percentile(const double *v, size_t n, double p)
{
    if (n == 0) return 0;
    size_t rank = (size_t)(p / 100.0 * (double)n + 0.999999);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return v[rank - 1];
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_client URL NAME --calls N --window W [--payload BYTES] [--json OUT]\n");
    exit(2);
}

static long parse_count(const char *s, long min, long max, const char *what)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == 0 || *end || v < min || v > max) die(what, s);
    return v;
}

int main(int argc, char **argv)
{
    const char *url_arg = NULL, *name = NULL, *json_out = NULL;
    long calls = -1, window = -1, payload = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--calls") && i + 1 < argc)
            calls = parse_count(argv[++i], 1, 100000000, "--calls must be in 1..1e8");
        else if (!strcmp(argv[i], "--window") && i + 1 < argc)
            window = parse_count(argv[++i], 1, 1000000, "--window must be in 1..1e6");
        else if (!strcmp(argv[i], "--payload") && i + 1 < argc)
            payload = parse_count(argv[++i], 0, 100000000, "--payload must be in 0..1e8");
        else if (!strcmp(argv[i], "--json") && i + 1 < argc)
            json_out = argv[++i];
        else if (argv[i][0] == '-')
            usage();
        else if (!url_arg)
            url_arg = argv[i];
        else if (!name)
            name = argv[i];
        else
            usage();
    }
    if (!url_arg || !name || calls < 0 || window < 0) usage();

    size_t warmup = (size_t)calls / 10 < 1000 ? (size_t)calls / 10 : 1000;
    total_calls = warmup + (size_t)calls;
    measure_from = warmup;
    state = calloc(total_calls, 1);
    sent_ns = calloc(total_calls, sizeof *sent_ns);
    latency_us = calloc((size_t)calls, sizeof *latency_us);
    if (!state || !sent_ns || !latency_us) die("out of memory", NULL);

    /* The request body, the same for every call: [["xxx..."],{}] */
    size_t body_len = (size_t)payload + 9;
    char *body_buf = malloc(body_len);
    if (!body_buf) die("out of memory", NULL);
    memcpy(body_buf, "[[\"", 3);
    memset(body_buf + 3, 'x', (size_t)payload);
    memcpy(body_buf + 3 + payload, "\"],{}]", 6);
    amqp_bytes_t body = {.len = body_len, .bytes = body_buf};

    char key[256];
    snprintf(key, sizeof key, "async_%s", name);
    amqp_bytes_t routing_key = amqp_cstring_bytes(key);

    char *url = strdup(url_arg); /* amqp_parse_url writes into it */
    struct amqp_connection_info ci;
    amqp_default_connection_info(&ci);
    if (!url || amqp_parse_url(url, &ci) != AMQP_STATUS_OK) die("cannot parse URL", url_arg);
    if (ci.ssl) die("amqps:// is not supported by the baseline", url_arg);
    /* amqp://host/ names the default vhost, as every AMQP client (and our
     * host) takes it; rabbitmq-c alone would ask for the vhost "". */
    if (!ci.vhost || !*ci.vhost) ci.vhost = "/";

    conn = amqp_new_connection();
    amqp_socket_t *sock = amqp_tcp_socket_new(conn);
    if (!sock) die("cannot create socket", NULL);
    int rc = amqp_socket_open(sock, ci.host, ci.port);
    if (rc != AMQP_STATUS_OK) die("cannot connect", amqp_error_string2(rc));
    check_reply(amqp_login(conn, ci.vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, ci.user, ci.password), "login");
    amqp_channel_open(conn, CHANNEL);
    check_reply(amqp_get_rpc_reply(conn), "channel.open");
    amqp_confirm_select(conn, CHANNEL);
    check_reply(amqp_get_rpc_reply(conn), "confirm.select");
    unconfirmed = 1;

    /* Server-named, exclusive, auto-delete reply queue. */
    amqp_queue_declare_ok_t *q = amqp_queue_declare(conn, CHANNEL, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "queue.declare (reply queue)");
    if (q->queue.len >= sizeof reply_queue) die("reply queue name too long", NULL);
    memcpy(reply_queue, q->queue.bytes, q->queue.len);
    reply_queue[q->queue.len] = 0;
    /* no_local 0, no_ack 1, exclusive 1 */
    amqp_basic_consume(conn, CHANNEL, amqp_cstring_bytes(reply_queue), amqp_empty_bytes, 0, 1, 1, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "basic.consume (reply queue)");

    if (warmup) run_calls(0, warmup, (size_t)window, routing_key, body);
    size_t warm_failed = failed;

    double cpu0 = cpu_seconds();
    uint64_t t0 = now_ns();
    run_calls(warmup, (size_t)calls, (size_t)window, routing_key, body);
    double seconds = (double)(now_ns() - t0) / 1e9;
    double cpu = cpu_seconds() - cpu0;

    size_t measured_failed = failed - warm_failed;
    qsort(latency_us, n_latency, sizeof *latency_us, cmp_double);
    double p50 = percentile(latency_us, n_latency, 50), p99 = percentile(latency_us, n_latency, 99);
    double rate = (double)calls / seconds;

    printf("bench_client: %s: %ld calls, window %ld, payload %ld B: %.3f s, %.0f calls/s, "
           "p50 %.0f us, p99 %.0f us, client cpu %.2f s (%.0f%%), %zu failed",
           name, calls, window, payload, seconds, rate, p50, p99, cpu, 100 * cpu / seconds, measured_failed);
    if (warm_failed) printf(" (+%zu in warm-up)", warm_failed);
    if (compressed) printf(", %zu compressed replies not checked", compressed);
    printf("\n");

    if (json_out) {
        FILE *f = fopen(json_out, "w");
        if (!f) die("cannot write", json_out);
        fprintf(f,
                "{\"calls\": %ld, \"window\": %ld, \"payload\": %ld, \"seconds\": %.6f, \"calls_per_s\": %.1f, "
                "\"p50_us\": %.1f, \"p99_us\": %.1f, \"failed\": %zu, \"client_cpu_s\": %.3f, "
                "\"warmup\": %zu, \"t0_s\": %.6f, \"t1_s\": %.6f}\n",
                calls, window, payload, seconds, rate, p50, p99, measured_failed, cpu, warmup, (double)t0 / 1e9,
                (double)t0 / 1e9 + seconds);
        if (fclose(f) != 0) die("cannot write", json_out);
    }

    amqp_channel_close(conn, CHANNEL, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
    free(url);
    free(body_buf);
    free(state);
    free(sent_ns);
    free(latency_us);
    /* Failed calls make the run fail: a figure with failures is not a
     * figure of the same work. */
    return measured_failed || warm_failed ? 1 : 0;
}

/* What both baseline programs need to fail clearly. Each defines
 * PROGRAM_NAME before including this, and builds from one .c file. */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <amqp.h>
#include <stdio.h>
#include <stdlib.h>

static void die(const char *what, const char *detail)
{
    fprintf(stderr, PROGRAM_NAME ": %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(1);
}

/* rabbitmq-c reports RPC failures in an amqp_rpc_reply_t; turn any failure
 * into a readable message and exit. */
static void check_reply(amqp_rpc_reply_t r, const char *what)
{
    char buf[512];
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        return;
    case AMQP_RESPONSE_NONE:
        die(what, "missing RPC reply");
        break;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        die(what, amqp_error_string2(r.library_error));
        break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            amqp_connection_close_t *m = r.reply.decoded;
            snprintf(buf, sizeof buf, "connection closed by broker: %u %.*s", m->reply_code,
                     (int)m->reply_text.len, (const char *)m->reply_text.bytes);
        } else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            amqp_channel_close_t *m = r.reply.decoded;
            snprintf(buf, sizeof buf, "channel closed by broker: %u %.*s", m->reply_code,
                     (int)m->reply_text.len, (const char *)m->reply_text.bytes);
        } else {
            snprintf(buf, sizeof buf, "unexpected server method 0x%08x", r.reply.id);
        }
        die(what, buf);
        break;
    }
}

#endif

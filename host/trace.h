/* W3C Trace Context: the traceparent header every request carries, so that
 * the log lines of one call, and of the calls it makes, share a trace id.
 * "00-<trace id: 32 hex>-<span id: 16 hex>-<flags: 2 hex>". A request's
 * span id is the caller's span for that call; a call made while serving it
 * gets the same trace id and a new span id. */
#ifndef RB_TRACE_H
#define RB_TRACE_H

#include <stdint.h>

#define RB_TRACEPARENT_LEN 55

typedef struct rb_trace {
    char trace_id[33];
    char span_id[17];
    char flags[3];
} rb_trace;

/* Reads a traceparent value (s, n bytes). 0, or -1 when it is not one that
 * W3C's rules accept (then *out is untouched). */
int rb_trace_parse(const char *s, unsigned long n, rb_trace *out);
/* A new trace: fresh trace and span ids, sampled. */
void rb_trace_start(rb_trace *t);
/* parent's trace, a fresh span id. */
void rb_trace_child(const rb_trace *parent, rb_trace *child);
/* Writes the header value, RB_TRACEPARENT_LEN bytes and a NUL. */
void rb_trace_format(const rb_trace *t, char out[RB_TRACEPARENT_LEN + 1]);

/* 64 fresh random bits: seeded from the kernel, and again in a child after
 * fork(), so that neither separate processes nor forked workers repeat each
 * other (random() is seeded by nothing a plain luajit runs). */
uint64_t rb_random64(void);

struct lua_State;
/* core.traceparent([parent]) -> a traceparent for a new request */
int rb_api_traceparent(struct lua_State *L);

#endif

/* traceparent values: parsed, checked, and made with fresh ids. Ids come
 * from a small generator seeded from the kernel, and seeded again in a
 * child after fork(), since workers are forked from one supervisor and must
 * not repeat each other's ids. */
#include "trace.h"

#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "lauxlib.h"

static uint64_t rng_state;
static int rng_seeded, rng_atfork;

static void forget_seed(void) {
    rng_seeded = 0;
}

static uint64_t splitmix64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t rb_random64(void) {
    if (!rng_seeded) {
        if (!rng_atfork) rng_atfork = pthread_atfork(NULL, NULL, forget_seed) == 0;
        uint64_t seed;
        if (getrandom(&seed, sizeof seed, GRND_NONBLOCK) != (ssize_t)sizeof seed) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            seed = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^ ((uint64_t)getpid() << 48);
        }
        rng_state = seed;
        /* Without the fork hook, every id is seeded afresh: slower, never repeated. */
        rng_seeded = rng_atfork;
    }
    return splitmix64();
}

/* n hex digits (n a multiple of 16) of fresh randomness; never all zeros,
 * which W3C reserves. Two digits a byte, from a table: this runs for every
 * request that comes without a trace. */
static void random_hex(char *out, int n) {
    static const char pairs[] = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
                                "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
                                "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
                                "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
                                "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
                                "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
                                "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf"
                                "e0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff";
    for (;;) {
        uint64_t any = 0;
        for (int i = 0; i < n; i += 16) {
            uint64_t r = rb_random64();
            any |= r;
            for (int j = 0; j < 16; j += 2, r >>= 8) memcpy(out + i + j, pairs + 2 * (r & 255), 2);
        }
        out[n] = '\0';
        if (any) return;
    }
}

/* 1 for a lowercase hex digit other than '0', 2 for '0', 0 for the rest. */
/* clang-format off */
static const unsigned char hex_kind[256] = {
    ['0'] = 2, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1, ['8'] = 1,
    ['9'] = 1, ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1,
};
/* clang-format on */

/* n lowercase hex digits, not all zeros when nonzero is asked. From a
 * table: every request that carries a trace is checked so. */
static int hex_field(const char *s, int n, int nonzero) {
    unsigned all = 3, any = 0;
    for (int i = 0; i < n; i++) {
        unsigned k = hex_kind[(unsigned char)s[i]];
        all &= k ? 3 : 0;
        any |= k & 1;
    }
    return all && (any || !nonzero);
}

int rb_trace_parse(const char *s, unsigned long n, rb_trace *out) {
    if (n < RB_TRACEPARENT_LEN || !hex_field(s, 2, 0) || !memcmp(s, "ff", 2)) return -1;
    /* Version 00 is exactly this long; a later version may append fields. */
    if (!memcmp(s, "00", 2) ? n != RB_TRACEPARENT_LEN
                            : n > RB_TRACEPARENT_LEN && s[RB_TRACEPARENT_LEN] != '-')
        return -1;
    if (s[2] != '-' || s[35] != '-' || s[52] != '-') return -1;
    if (!hex_field(s + 3, 32, 1) || !hex_field(s + 36, 16, 1) || !hex_field(s + 53, 2, 0)) return -1;
    memcpy(out->trace_id, s + 3, 32);
    out->trace_id[32] = '\0';
    memcpy(out->span_id, s + 36, 16);
    out->span_id[16] = '\0';
    memcpy(out->flags, s + 53, 2);
    out->flags[2] = '\0';
    return 0;
}

void rb_trace_start(rb_trace *t) {
    random_hex(t->trace_id, 32);
    random_hex(t->span_id, 16);
    memcpy(t->flags, "01", 3);
}

void rb_trace_child(const rb_trace *parent, rb_trace *child) {
    memcpy(child->trace_id, parent->trace_id, sizeof child->trace_id);
    memcpy(child->flags, parent->flags, sizeof child->flags);
    random_hex(child->span_id, 16);
}

void rb_trace_format(const rb_trace *t, char out[RB_TRACEPARENT_LEN + 1]) {
    memcpy(out, "00-", 3);
    memcpy(out + 3, t->trace_id, 32);
    out[35] = '-';
    memcpy(out + 36, t->span_id, 16);
    out[52] = '-';
    memcpy(out + 53, t->flags, 2);
    out[55] = '\0';
}

/* core.traceparent([parent]) -> traceparent: a child of parent (a
 * traceparent string) when it is a valid one, else a new trace. */
int rb_api_traceparent(lua_State *L) {
    size_t n = 0;
    const char *parent = luaL_optlstring(L, 1, NULL, &n);
    rb_trace p, t;
    if (parent && rb_trace_parse(parent, n, &p) == 0)
        rb_trace_child(&p, &t);
    else
        rb_trace_start(&t);
    char out[RB_TRACEPARENT_LEN + 1];
    rb_trace_format(&t, out);
    lua_pushlstring(L, out, RB_TRACEPARENT_LEN);
    return 1;
}

/* What the JSON and msgpack codecs share about Lua values: which tables are
 * arrays, 64-bit integers as LuaJIT cdata, strict UTF-8, the text of a
 * number, the output buffer, and the path that names a value neither can
 * write (args[2].name). Lua's API only: no host state. */
#ifndef RB_VALUES_H
#define RB_VALUES_H

#include <stddef.h>
#include <stdint.h>

#include "lua.h"

#define RB_ARRAY_MT "rabibridge.array_mt"
#define RB_MAX_DEPTH 1000
/* LuaJIT's type tag for cdata, which lua.h does not name. */
#define RB_TCDATA 10
#define RB_TWO_POW_53 9007199254740992.0
#define RB_TWO_POW_63 9223372036854775808.0

/* Makes the array metatable and looks up the ffi's 64-bit integer types.
 * Either codec calls it when it opens; the second call does nothing. */
void rb_values_open(lua_State *L);

/* ---- tables ---- */

/* Pushes the array metatable; -> its stack index. */
int rb_push_array_mt(lua_State *L);

/* The length to write the table at idx as an array, or -1 for a map.
 * mt_idx holds the array metatable (an upvalue index will do). */
double rb_array_length(lua_State *L, int idx, int mt_idx);

/* ---- 64-bit integers ---- */

enum { RB_NOT_INTEGER = 0, RB_INT64 = 1, RB_UINT64 = 2 };

/* Whether the cdata at idx is an int64_t or a uint64_t, with its bits in
 * *bits. Needs 4 free Lua stack slots. */
int rb_cdata_integer(lua_State *L, int idx, uint64_t *bits);

/* An integer from the wire: a Lua number while a double holds it exactly
 * (|v| <= 2^53), else int64_t cdata, or uint64_t above INT64_MAX. */
void rb_push_int64(lua_State *L, int64_t v);
void rb_push_uint64(lua_State *L, uint64_t v);

/* ---- UTF-8 ---- */

/* The length of the UTF-8 sequence that starts at s (s[0] >= 0x80) with
 * avail bytes left, and its code point in *cp; 0 if it is not one. Strict:
 * no overlong form, nothing above U+10FFFF. Surrogates (U+D800..DFFF, which
 * Python refuses in a str) are returned: the caller decides. */
size_t rb_utf8_sequence(const unsigned char *s, size_t avail, unsigned long *cp);

/* The offset of the first byte that is not strict UTF-8 (surrogates
 * included), or len when all of s is. */
size_t rb_utf8_invalid_at(const unsigned char *s, size_t len);

/* ---- numbers as text ---- */

size_t rb_format_int64(char *out, int64_t v);
size_t rb_format_uint64(char *out, uint64_t v);
/* %.*g with a '.' whatever LC_NUMERIC says. */
size_t rb_format_g(char *out, size_t size, int precision, double d);
/* A number table key as a string key: tostring's %.14g, except that every
 * integer below 2^53 is written out in full. */
size_t rb_format_key_number(char *out, size_t size, double k);

/* ---- the output buffer ---- */

/* Owned by a userdata, so that a raised error cannot leak it. */
typedef struct {
    char *data;
    size_t len, cap;
    /* Set while an encode writes into data: a __gc metamethod run by an
     * allocation could call the same encoder, which must take a new one. */
    int busy;
} rb_outbuf;

rb_outbuf *rb_outbuf_new(lua_State *L);
int rb_outbuf_grow(rb_outbuf *b, size_t need);
static inline int rb_outbuf_reserve(rb_outbuf *b, size_t need) {
    return b->cap - b->len >= need ? 0 : rb_outbuf_grow(b, need);
}
/* The buffer at upvalue index upv, or a fresh one (pushed) while it is
 * busy; marked busy until rb_outbuf_done. */
rb_outbuf *rb_outbuf_take(lua_State *L, int upv);
void rb_outbuf_done(rb_outbuf *b);

/* ---- where a value sits ---- */

/* Built while a failure unwinds, each level putting its step in front; when
 * it outgrows the buffer the innermost steps are dropped. */
typedef struct {
    char text[160];
    size_t len;
    int cut;
} rb_path;

void rb_path_index(rb_path *p, double i);
void rb_path_key(rb_path *p, lua_State *L, int idx);

/* "message at ROOTPATH" (root may be NULL), cut to fit size. */
void rb_format_failure(char *out, size_t size, const char *message, const rb_path *p, const char *root);
/* Pushes nil and that message: how both encoders fail. */
int rb_push_failure(lua_State *L, const char *message, const rb_path *p, const char *root);

/* ---- the request [args, kwargs] ---- */

/* Args with more holes than this are refused, not sent as a run of nulls. */
#define RB_MAX_ARG_HOLES 1000
/* Room for any message a request's writer fails with. */
#define RB_REQUEST_ERROR_MAX 256

typedef struct {
    int nargs;  /* args[1..nargs] go as the array, a hole as null */
    int kwargs; /* kwargs has a key: it goes as the map, else {} does */
} rb_request_shape;

/* What the request of args and kwargs (stack indices; 0, nil or none: not
 * given) is made of. args must be a table keyed 1..n, kwargs a table keyed
 * by strings. -1 with why in err for anything else. */
int rb_request_shape_of(lua_State *L, int args, int kwargs, rb_request_shape *out, char *err, size_t errlen);

#endif

/* The body layer under the serialiser: zstd above a size threshold, and
 * recognising a compressed body by the zstd frame magic, as RabiBridge does. */
#ifndef RB_CODEC_H
#define RB_CODEC_H

#include <stddef.h>

typedef struct {
    char *data;
    size_t len, cap;
} rb_buf;

void rb_buf_free(rb_buf *b);
int rb_buf_reserve(rb_buf *b, size_t cap);

int rb_body_is_compressed(const void *data, size_t len);

/* Compresses in into out when len > threshold. Returns 1 if out holds the
 * compressed body, 0 if the body should go as it is, -1 on error. */
int rb_body_compress(const void *in, size_t len, size_t threshold, rb_buf *out);

/* Decompresses a zstd body into out, refusing more than max bytes. Returns 0,
 * or -1 with a message in err. */
int rb_body_decompress(const void *in, size_t len, size_t max, rb_buf *out, const char **err);

/* The body as the serialiser sees it, for client and server alike: a body
 * over max is refused (what names it: "request", "reply"), a zstd frame is
 * decompressed into scratch, anything else is used in place. Returns 0 with
 * *out and *outlen set, or -1 with a message in err. */
int rb_body_unwrap(const char *what, const void *body, size_t len, size_t max, rb_buf *scratch,
                   const void **out, size_t *outlen, char *err, size_t errlen);

/* Frees the process's zstd contexts (at exit, for leak checkers). */
void rb_codec_free(void);

#endif

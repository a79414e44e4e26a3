/* zstd framing of message bodies. The streaming decoder is used because a
 * sender need not record the content size in the frame header, and because
 * it lets us stop at max_body instead of trusting a declared size. */
#include "codec.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

static const unsigned char zstd_magic[4] = {0x28, 0xB5, 0x2F, 0xFD};

void rb_buf_free(rb_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

int rb_buf_reserve(rb_buf *b, size_t cap) {
    if (cap <= b->cap) return 0;
    size_t n = b->cap ? b->cap : 256;
    while (n < cap) n *= 2;
    char *grown = realloc(b->data, n);
    if (!grown) return -1;
    b->data = grown;
    b->cap = n;
    return 0;
}

int rb_body_is_compressed(const void *data, size_t len) {
    return len >= 4 && memcmp(data, zstd_magic, 4) == 0;
}

/* Contexts are made once per process, on first use: creating one costs
 * more than compressing a 10 KiB body. A process has one thread, so one
 * pair serves every link. */
static ZSTD_CCtx *zstd_cctx;
static ZSTD_DCtx *zstd_dctx;

static ZSTD_CCtx *cctx(void) {
    if (!zstd_cctx) zstd_cctx = ZSTD_createCCtx();
    return zstd_cctx;
}

static ZSTD_DCtx *dctx(void) {
    if (!zstd_dctx) zstd_dctx = ZSTD_createDCtx();
    return zstd_dctx;
}

void rb_codec_free(void) {
    ZSTD_freeCCtx(zstd_cctx);
    ZSTD_freeDCtx(zstd_dctx);
    zstd_cctx = NULL;
    zstd_dctx = NULL;
}

int rb_body_compress(const void *in, size_t len, size_t threshold, rb_buf *out) {
    if (len <= threshold) return 0;
    size_t bound = ZSTD_compressBound(len);
    ZSTD_CCtx *cc = cctx();
    if (!cc || rb_buf_reserve(out, bound) < 0) return -1;
    /* Level 3 is zstd's default and what python-zstandard uses. */
    size_t n = ZSTD_compressCCtx(cc, out->data, out->cap, in, len, 3);
    if (ZSTD_isError(n)) return -1;
    out->len = n;
    return 1;
}

int rb_body_decompress(const void *in, size_t len, size_t max, rb_buf *out, const char **err) {
    ZSTD_DCtx *dc = dctx();
    if (!dc) {
        *err = "out of memory";
        return -1;
    }
    ZSTD_DCtx_reset(dc, ZSTD_reset_session_only);
    out->len = 0;
    ZSTD_inBuffer input = {in, len, 0};
    size_t ret = 1;
    int rc = 0;
    while (input.pos < input.size || ret != 0) {
        if (out->len == out->cap && rb_buf_reserve(out, out->cap ? out->cap * 2 : len * 4 + 256) < 0) {
            *err = "out of memory";
            rc = -1;
            break;
        }
        ZSTD_outBuffer output = {out->data, out->cap, out->len};
        ret = ZSTD_decompressStream(dc, &output, &input);
        out->len = output.pos;
        if (ZSTD_isError(ret)) {
            *err = ZSTD_getErrorName(ret);
            rc = -1;
            break;
        }
        if (out->len > max) {
            *err = "decompressed body larger than max_body";
            rc = -1;
            break;
        }
        if (input.pos == input.size && ret != 0 && output.pos < output.size) {
            *err = "truncated zstd frame";
            rc = -1;
            break;
        }
    }
    return rc;
}

int rb_body_unwrap(const char *what, const void *body, size_t len, size_t max, rb_buf *scratch,
                   const void **out, size_t *outlen, char *err, size_t errlen) {
    const char *why = NULL;
    if (len > max) {
        snprintf(err, errlen, "%s body of %zu bytes exceeds max_body (%zu)", what, len, max);
        return -1;
    }
    if (!rb_body_is_compressed(body, len)) {
        *out = body;
        *outlen = len;
        return 0;
    }
    if (rb_body_decompress(body, len, max, scratch, &why) < 0) {
        snprintf(err, errlen, "cannot decompress the %s: %s", what, why);
        return -1;
    }
    *out = scratch->data;
    *outlen = scratch->len;
    return 0;
}

/* Secrets. Encrypted broker passwords in RabiBridge's format: key and IV are
 * bytes 0-31 and 32-47 of SHA-512 over the base64 of the secret; AES-256-CBC
 * with PKCS#7 padding; the ciphertext travels as base64. All of it is
 * OpenSSL's libcrypto: no cipher code of our own. And broker URLs with their
 * password masked, for every message that shows a URL. */
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

#include "crypto.h"
#include "url.h"
#include "lauxlib.h"

enum {
    MAX_PASSWORD = 4095,
    MAX_WRAPPED = 4 * ((MAX_PASSWORD + 2) / 3),   /* base64 of a password */
    MAX_CIPHER = MAX_WRAPPED + 16,                /* AES with its padding */
    MAX_CIPHER_TEXT = 4 * ((MAX_CIPHER + 2) / 3), /* base64 of that */
};

static int derive_key_iv(const char *secret, size_t len, unsigned char key_iv[64]) {
    size_t b64cap = 4 * ((len + 2) / 3) + 1;
    unsigned char *b64 = malloc(b64cap);
    if (!b64) return -1;
    int b64len = EVP_EncodeBlock(b64, (const unsigned char *)secret, (int)len);
    unsigned int mdlen = 0;
    int ok = EVP_Digest(b64, (size_t)b64len, key_iv, &mdlen, EVP_sha512(), NULL);
    free(b64);
    return ok && mdlen == 64 ? 0 : -1;
}

/* Runs AES-256-CBC one way or the other. Returns the output length or -1. */
static int aes_cbc(int encrypt, const unsigned char key_iv[64], const unsigned char *in, int inlen,
                   unsigned char *out) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx) return -1;
    int n1 = 0, n2 = 0;
    int ok = EVP_CipherInit_ex(ctx, EVP_aes_256_cbc(), NULL, key_iv, key_iv + 32, encrypt) &&
             EVP_CipherUpdate(ctx, out, &n1, in, inlen) && EVP_CipherFinal_ex(ctx, out + n1, &n2);
    EVP_CIPHER_CTX_free(ctx);
    return ok ? n1 + n2 : -1;
}

/* Strict UTF-8, as Python's bytes.decode: no overlong forms, no surrogates,
 * nothing above U+10FFFF. */
static int utf8_valid(const unsigned char *s, size_t len) {
    for (size_t i = 0; i < len;) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
        if (!n || i + n > len) return 0;
        /* The second byte's range rules out overlong forms, surrogates and
         * code points above U+10FFFF. */
        unsigned char lo = c == 0xE0 ? 0xA0 : c == 0xF0 ? 0x90 : 0x80;
        unsigned char hi = c == 0xED ? 0x9F : c == 0xF4 ? 0x8F : 0xBF;
        if (s[i + 1] < lo || s[i + 1] > hi) return 0;
        for (size_t j = 2; j < n; j++)
            if ((s[i + j] & 0xC0) != 0x80) return 0;
        i += n;
    }
    return 1;
}

/* Decodes canonical base64 (whole quads, '=' only as padding) into out.
 * Returns the decoded length, or -1 when text is not such base64. */
static int base64_decode(const unsigned char *text, size_t len, unsigned char *out) {
    if (len % 4 != 0 || len > (size_t)MAX_CIPHER_TEXT) return -1;
    size_t pad = len > 0 && text[len - 1] == '=' ? (len > 1 && text[len - 2] == '=' ? 2 : 1) : 0;
    for (size_t i = 0; i < len - pad; i++)
        if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", text[i]) || !text[i])
            return -1;
    int n = EVP_DecodeBlock(out, text, (int)len);
    /* DecodeBlock counts the bytes behind '=' padding too. */
    return n < 0 ? -1 : n - (int)pad;
}

/* core.encrypt_password(password, secret) -> base64 ciphertext. What is
 * encrypted is the base64 of the password, as RabiBridge's runtime reads it
 * (its decode_pwd base64-decodes what it decrypts). */
static int api_encrypt_password(lua_State *L) {
    size_t plen, slen;
    const char *password = luaL_checklstring(L, 1, &plen);
    const char *secret = luaL_checklstring(L, 2, &slen);
    luaL_argcheck(L, plen <= MAX_PASSWORD, 1, "password longer than 4095 bytes");
    unsigned char key_iv[64], wrapped[MAX_WRAPPED + 1], cipher[MAX_CIPHER], text[MAX_CIPHER_TEXT + 1];
    if (derive_key_iv(secret, slen, key_iv) < 0) return luaL_error(L, "cannot derive the key");
    int wlen = EVP_EncodeBlock(wrapped, (const unsigned char *)password, (int)plen);
    int n = aes_cbc(1, key_iv, wrapped, wlen, cipher);
    if (n < 0) return luaL_error(L, "encryption failed");
    int tlen = EVP_EncodeBlock(text, cipher, n);
    lua_pushlstring(L, (const char *)text, (size_t)tlen);
    return 1;
}

static int fail(lua_State *L, const char *message) {
    lua_pushnil(L);
    lua_pushstring(L, message);
    return 2;
}

/* core.decrypt_password(ciphertext, secret) -> password | nil, message.
 * RabiBridge's files hold AES(base64(password)); its encrypt_pwd writes
 * AES(password). The decrypted text is unwrapped when it is base64 of UTF-8,
 * as RabiBridge's runtime does, and taken as it is otherwise. */
static int api_decrypt_password(lua_State *L) {
    size_t clen, slen;
    const char *text = luaL_checklstring(L, 1, &clen);
    const char *secret = luaL_checklstring(L, 2, &slen);
    unsigned char cipher[MAX_CIPHER_TEXT], plain[MAX_CIPHER + 16], unwrapped[MAX_CIPHER], key_iv[64];
    int n = base64_decode((const unsigned char *)text, clen, cipher);
    if (n <= 0 || n % 16 != 0)
        return fail(L, "the encrypted password is not base64 of AES blocks (was it made with `rabihost "
                       "encrypt-password` or RabiBridge's encrypt_pwd?)");
    if (derive_key_iv(secret, slen, key_iv) < 0) return luaL_error(L, "cannot derive the key");
    int m = aes_cbc(0, key_iv, cipher, n, plain);
    if (m < 0 || !utf8_valid(plain, (size_t)m))
        return fail(L, "cannot decrypt the broker password: wrong secret (check SECRET or the config's "
                       "secret section)");
    int u = base64_decode(plain, (size_t)m, unwrapped);
    if (u >= 0 && utf8_valid(unwrapped, (size_t)u) && !memchr(unwrapped, 0, (size_t)u))
        lua_pushlstring(L, (const char *)unwrapped, (size_t)u);
    else
        lua_pushlstring(L, (const char *)plain, (size_t)m);
    return 1;
}

/* core.mask_url(url) -> url with no password in it */
static int api_mask_url(lua_State *L) {
    size_t len;
    const char *url = luaL_checklstring(L, 1, &len);
    size_t cap = RB_MASKED_MAX(len);
    char *out = lua_newuserdata(L, cap);
    rb_mask_url(url, out, cap);
    lua_pushstring(L, out);
    return 1;
}

void rb_open_crypto(lua_State *L) {
    lua_pushcfunction(L, api_encrypt_password);
    lua_setfield(L, -2, "encrypt_password");
    lua_pushcfunction(L, api_decrypt_password);
    lua_setfield(L, -2, "decrypt_password");
    lua_pushcfunction(L, api_mask_url);
    lua_setfield(L, -2, "mask_url");
}

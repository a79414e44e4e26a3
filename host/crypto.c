/* Encrypted broker passwords in RabiBridge's format: key and IV are bytes
 * 0-31 and 32-47 of SHA-512 over the base64 of the secret; AES-256-CBC with
 * PKCS#7 padding; the ciphertext travels as base64. All of it is OpenSSL's
 * libcrypto: no cipher code of our own. */
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

#include "crypto.h"
#include "lauxlib.h"

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

static int utf8_valid(const unsigned char *s, int len) {
    for (int i = 0; i < len;) {
        int n = s[i] < 0x80 ? 1 : (s[i] >> 5) == 6 ? 2 : (s[i] >> 4) == 14 ? 3 : (s[i] >> 3) == 30 ? 4 : 0;
        if (!n || i + n > len) return 0;
        for (int j = 1; j < n; j++)
            if ((s[i + j] & 0xC0) != 0x80) return 0;
        i += n;
    }
    return 1;
}

/* core.encrypt_password(password, secret) -> base64 ciphertext */
static int api_encrypt_password(lua_State *L) {
    size_t plen, slen;
    const char *password = luaL_checklstring(L, 1, &plen);
    const char *secret = luaL_checklstring(L, 2, &slen);
    luaL_argcheck(L, plen < 4096, 1, "password longer than 4095 bytes");
    unsigned char key_iv[64], cipher[4096 + 32], b64[2 * 4096 + 64];
    if (derive_key_iv(secret, slen, key_iv) < 0) return luaL_error(L, "cannot derive the key");
    int n = aes_cbc(1, key_iv, (const unsigned char *)password, (int)plen, cipher);
    if (n < 0) return luaL_error(L, "encryption failed");
    int b64len = EVP_EncodeBlock(b64, cipher, n);
    lua_pushlstring(L, (const char *)b64, (size_t)b64len);
    return 1;
}

/* core.decrypt_password(ciphertext, secret) -> password | nil, message */
static int api_decrypt_password(lua_State *L) {
    size_t clen, slen;
    const char *text = luaL_checklstring(L, 1, &clen);
    const char *secret = luaL_checklstring(L, 2, &slen);
    unsigned char cipher[4096], plain[4096 + 32], key_iv[64];
    if (clen == 0 || clen % 4 != 0 || clen > 5000) {
        lua_pushnil(L);
        lua_pushstring(L, "the encrypted password is not base64 of an AES block (was it encrypted with "
                          "`rabihost encrypt-password`?)");
        return 2;
    }
    int n = EVP_DecodeBlock(cipher, (const unsigned char *)text, (int)clen);
    /* DecodeBlock counts the bytes behind '=' padding too. */
    if (n > 0 && text[clen - 1] == '=') n--;
    if (n > 0 && text[clen - 2] == '=') n--;
    if (n <= 0 || n % 16 != 0) {
        lua_pushnil(L);
        lua_pushstring(L, "the encrypted password is not valid base64 of AES blocks");
        return 2;
    }
    if (derive_key_iv(secret, slen, key_iv) < 0) return luaL_error(L, "cannot derive the key");
    int m = aes_cbc(0, key_iv, cipher, n, plain);
    if (m < 0 || !utf8_valid(plain, m)) {
        lua_pushnil(L);
        lua_pushstring(L, "cannot decrypt the broker password: wrong secret (check SECRET or the "
                          "config's secret section)");
        return 2;
    }
    lua_pushlstring(L, (const char *)plain, (size_t)m);
    return 1;
}

void rb_open_crypto(lua_State *L) {
    lua_pushcfunction(L, api_encrypt_password);
    lua_setfield(L, -2, "encrypt_password");
    lua_pushcfunction(L, api_decrypt_password);
    lua_setfield(L, -2, "decrypt_password");
}

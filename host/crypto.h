/* RabiBridge's encrypted passwords: see crypto.c. */
#ifndef RB_CRYPTO_H
#define RB_CRYPTO_H

#include "lua.h"

/* Sets encrypt_password, decrypt_password and mask_url in the module table
 * on top of the stack. */
void rb_open_crypto(lua_State *L);

/* host/toml.cc (C++): sets toml_decode in the module table on top of the
 * stack. */
void rb_open_toml(lua_State *L);

#endif

/* Broker URLs made safe to show: see url.c. */
#ifndef RB_URL_H
#define RB_URL_H

#include <stddef.h>

/* Writes url (a broker URL, or several separated by spaces) into out with
 * whatever could be a password masked, however malformed the URL. */
void rb_mask_url(const char *url, char *out, size_t outlen);
/* Room that rb_mask_url's out needs for a URL list of len bytes. */
#define RB_MASKED_MAX(len) (5 * (len) + 1)

#endif

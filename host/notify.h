/* systemd's service notifications (sd_notify's protocol, without
 * libsystemd): one datagram per state change to $NOTIFY_SOCKET, and the
 * watchdog's keep-alive when $WATCHDOG_USEC asks for it. Without
 * $NOTIFY_SOCKET every call does nothing. */
#ifndef RB_NOTIFY_H
#define RB_NOTIFY_H

#include <stdint.h>

/* Sends state ("READY=1", "STOPPING=1"...). 0, or -1 (errno set). */
int rb_notify(const char *state);
/* Sends WATCHDOG=1 when half the watchdog's interval has passed since the
 * last; now_ms is the monotonic clock (rb_now_ms). */
void rb_notify_watchdog(uint64_t now_ms);

#endif

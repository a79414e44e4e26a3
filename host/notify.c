/* sd_notify's protocol, as systemd documents it: a datagram of
 * newline-separated VAR=value assignments to the unix socket named by
 * $NOTIFY_SOCKET, an abstract one when the name starts with '@'. */
#include "notify.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"

int rb_notify(const char *state) {
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !*path) return 0;
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    size_t len = strlen(path);
    if ((path[0] != '/' && path[0] != '@') || len >= sizeof sa.sun_path) {
        errno = EINVAL;
        return -1;
    }
    memcpy(sa.sun_path, path, len);
    if (sa.sun_path[0] == '@') sa.sun_path[0] = '\0';
    socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + (path[0] == '/'));
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    ssize_t n = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&sa, salen);
    int saved = errno;
    close(fd);
    if (n < 0) {
        rb_log(RB_LOG_WARN, "cannot notify systemd (%s): %s", path, strerror(saved));
        errno = saved;
        return -1;
    }
    return 0;
}

/* The watchdog's interval in ms, 0 when none is asked of this process. */
static uint64_t watchdog_ms(void) {
    static int known;
    static uint64_t ms;
    if (known) return ms;
    known = 1;
    const char *usec = getenv("WATCHDOG_USEC");
    const char *pid = getenv("WATCHDOG_PID");
    if (!usec || (pid && *pid && strtol(pid, NULL, 10) != (long)getpid())) return 0;
    ms = strtoull(usec, NULL, 10) / 1000u;
    return ms;
}

void rb_notify_watchdog(uint64_t now_ms) {
    static uint64_t last;
    uint64_t every = watchdog_ms() / 2;
    if (!every || now_ms - last < every) return;
    last = now_ms;
    rb_notify("WATCHDOG=1");
}

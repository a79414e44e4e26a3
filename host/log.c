/* The logger. Each line is formatted whole and written with one fprintf, so
 * that lines of several workers sharing stderr never interleave. */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "lauxlib.h"

static int log_level = RB_LOG_INFO;
static int log_worker = -1;

static const char *const level_names[] = {"DEBUG", "INFO", "WARN", "ERROR", "OFF", NULL};

int rb_log_enabled(int level) {
    return level >= log_level;
}

void rb_log_set_level(int level) {
    log_level = level;
}

void rb_log_set_worker(int worker_id) {
    log_worker = worker_id;
}

/* One event, one line: a traceback's lines are joined with "|". */
static void flatten(char *msg) {
    for (char *p = msg; *p; p++) {
        if (*p == '\n')
            *p = '|';
        else if (*p == '\t')
            *p = ' ';
    }
}

void rb_log(int level, const char *fmt, ...) {
    if (level < log_level) return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    flatten(msg);
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    char stamp[32];
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    char who[32];
    if (log_worker >= 0)
        snprintf(who, sizeof who, "%d w%d", (int)getpid(), log_worker);
    else
        snprintf(who, sizeof who, "%d", (int)getpid());
    fprintf(stderr, "%s.%03dZ %-5s [%s] %s\n", stamp, (int)(tv.tv_usec / 1000), level_names[level], who, msg);
}

/* ---- Lua API ---- */

/* core.log(level, message) */
int rb_api_log(lua_State *L) {
    int level = luaL_checkoption(L, 1, NULL, level_names);
    const char *msg = luaL_checkstring(L, 2);
    rb_log(level, "%s", msg);
    return 0;
}

/* core.set_log_level(level) */
int rb_api_set_log_level(lua_State *L) {
    rb_log_set_level(luaL_checkoption(L, 1, NULL, level_names));
    return 0;
}

/* core.log_enabled(level) -> boolean */
int rb_api_log_enabled(lua_State *L) {
    lua_pushboolean(L, rb_log_enabled(luaL_checkoption(L, 1, NULL, level_names)));
    return 1;
}

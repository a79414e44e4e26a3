/* The logger. Each line is formatted whole and written with one fwrite, so
 * that lines of several workers sharing stderr never interleave. */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "lauxlib.h"

static int log_level = RB_LOG_INFO;
static int log_format = RB_LOG_TEXT;
static int log_worker = -1;
static int log_access;

static const char *const level_names[] = {"DEBUG", "INFO", "WARN", "ERROR", "OFF", NULL};
static const char *const format_names[] = {"text", "json", NULL};

int rb_log_enabled(int level) {
    return level >= log_level;
}

void rb_log_set_level(int level) {
    log_level = level;
}

void rb_log_set_format(int format) {
    log_format = format;
}

void rb_log_set_worker(int worker_id) {
    log_worker = worker_id;
}

void rb_log_set_access(int on) {
    log_access = on;
}

int rb_log_access_enabled(void) {
    return log_access;
}

/* ---- a line being written ---- */

#define LINE_MAX_BYTES 8192

typedef struct {
    char buf[LINE_MAX_BYTES];
    size_t len;
    int full;
} line;

/* Appends n bytes, or nothing once the line is full (the newline always
 * fits: one byte is kept for it). */
static void put(line *l, const char *s, size_t n) {
    if (l->full || l->len + n > sizeof l->buf - 1) {
        l->full = 1;
        return;
    }
    memcpy(l->buf + l->len, s, n);
    l->len += n;
}

static void puts_(line *l, const char *s) {
    put(l, s, strlen(s));
}

/* The length of the UTF-8 sequence at s (n bytes left), 0 when invalid. */
static size_t utf8_len(const unsigned char *s, size_t n) {
    size_t len = s[0] >= 0xF0 ? 4 : s[0] >= 0xE0 ? 3 : s[0] >= 0xC2 ? 2 : 0;
    if (s[0] > 0xF4 || len == 0 || len > n) return 0;
    for (size_t i = 1; i < len; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    if (len == 3 && ((s[0] == 0xE0 && s[1] < 0xA0) || (s[0] == 0xED && s[1] >= 0xA0))) return 0;
    if (len == 4 && ((s[0] == 0xF0 && s[1] < 0x90) || (s[0] == 0xF4 && s[1] >= 0x90))) return 0;
    return len;
}

/* A JSON string: control characters escaped, bytes that are not UTF-8
 * replaced by U+FFFD, so that every line parses whatever a handler wrote. */
static void put_json_string(line *l, const char *s) {
    put(l, "\"", 1);
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s);
    while (n > 0) {
        size_t k = 1;
        char esc[8];
        if (*p == '"' || *p == '\\') {
            esc[0] = '\\';
            esc[1] = (char)*p;
            put(l, esc, 2);
        } else if (*p == '\n') {
            put(l, "\\n", 2);
        } else if (*p == '\t') {
            put(l, "\\t", 2);
        } else if (*p < 0x20 || *p == 0x7F) {
            snprintf(esc, sizeof esc, "\\u%04x", *p);
            put(l, esc, 6);
        } else if (*p < 0x80) {
            put(l, (const char *)p, 1);
        } else if ((k = utf8_len(p, n)) > 0) {
            put(l, (const char *)p, k);
        } else {
            k = 1;
            put(l, "\\ufffd", 6);
        }
        p += k;
        n -= k;
    }
    put(l, "\"", 1);
}

/* One event, one line: a traceback's lines are joined with "|". */
static void put_flat(line *l, const char *s) {
    for (; *s; s++) {
        char c = *s == '\n' ? '|' : *s == '\t' ? ' ' : *s;
        put(l, &c, 1);
    }
}

static void put_number(line *l, double v) {
    char num[32];
    /* %.17g would write 0.1 as 0.10000000000000001; durations need less. */
    int n = snprintf(num, sizeof num, "%.15g", v);
    put(l, num, (size_t)n);
}

static void emit(const char *level, const rb_log_field *fields, int nfields, const char *msg) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    char stamp[48];
    size_t n = strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(stamp + n, sizeof stamp - n, ".%03dZ", (int)(tv.tv_usec / 1000));
    line l;
    l.len = 0;
    l.full = 0;
    char head[96];
    if (log_format == RB_LOG_JSON) {
        int len = snprintf(head, sizeof head, "{\"time\":\"%s\",\"level\":\"%s\",\"pid\":%d", stamp, level,
                           (int)getpid());
        put(&l, head, (size_t)len);
        if (log_worker >= 0) {
            len = snprintf(head, sizeof head, ",\"worker\":%d", log_worker);
            put(&l, head, (size_t)len);
        }
        puts_(&l, ",\"msg\":");
        put_json_string(&l, msg);
        for (int i = 0; i < nfields; i++) {
            put(&l, ",", 1);
            put_json_string(&l, fields[i].key);
            put(&l, ":", 1);
            if (fields[i].text)
                put_json_string(&l, fields[i].text);
            else
                put_number(&l, fields[i].number);
        }
        put(&l, "}", 1);
        /* A line cut short must still parse: its end is dropped whole. */
        if (l.full) {
            l.full = 0;
            l.len = 0;
            len = snprintf(head, sizeof head,
                           "{\"time\":\"%s\",\"level\":\"%s\",\"pid\":%d,\"truncated\":true,\"msg\":", stamp,
                           level, (int)getpid());
            put(&l, head, (size_t)len);
            char cut[1024];
            snprintf(cut, sizeof cut, "%s", msg);
            put_json_string(&l, cut);
            put(&l, "}", 1);
        }
    } else {
        char who[32];
        if (log_worker >= 0)
            snprintf(who, sizeof who, "%d w%d", (int)getpid(), log_worker);
        else
            snprintf(who, sizeof who, "%d", (int)getpid());
        int len = snprintf(head, sizeof head, "%s %-5s [%s] ", stamp, level, who);
        put(&l, head, (size_t)len);
        put_flat(&l, msg);
        for (int i = 0; i < nfields; i++) {
            put(&l, " ", 1);
            puts_(&l, fields[i].key);
            put(&l, "=", 1);
            if (fields[i].text)
                put_flat(&l, fields[i].text);
            else
                put_number(&l, fields[i].number);
        }
        l.full = 0;
    }
    l.buf[l.len++] = '\n';
    fwrite(l.buf, 1, l.len, stderr);
    fflush(stderr);
}

static void vlog(int level, const rb_log_field *fields, int nfields, const char *fmt, va_list ap) {
    char msg[2048];
    vsnprintf(msg, sizeof msg, fmt, ap);
    emit(level_names[level], fields, nfields, msg);
}

void rb_log(int level, const char *fmt, ...) {
    if (level < log_level) return;
    va_list ap;
    va_start(ap, fmt);
    vlog(level, NULL, 0, fmt, ap);
    va_end(ap);
}

void rb_log_fields(int level, const rb_log_field *fields, int nfields, const char *fmt, ...) {
    if (level < log_level) return;
    va_list ap;
    va_start(ap, fmt);
    vlog(level, fields, nfields, fmt, ap);
    va_end(ap);
}

void rb_log_access(const rb_log_field *fields, int nfields) {
    if (!log_access) return;
    emit("INFO", fields, nfields, "access");
}

/* ---- Lua API ---- */

#define MAX_LUA_FIELDS 16

/* core.log(level, message [, fields]): fields is a table of string keys and
 * string or number values (others are left out). */
int rb_api_log(lua_State *L) {
    int level = luaL_checkoption(L, 1, NULL, level_names);
    const char *msg = luaL_checkstring(L, 2);
    if (level < log_level) return 0;
    rb_log_field fields[MAX_LUA_FIELDS];
    int n = 0;
    if (lua_istable(L, 3)) {
        lua_pushnil(L);
        while (lua_next(L, 3) != 0) {
            int t = lua_type(L, -1);
            if (n < MAX_LUA_FIELDS && lua_type(L, -2) == LUA_TSTRING &&
                (t == LUA_TSTRING || t == LUA_TNUMBER)) {
                fields[n].key = lua_tostring(L, -2);
                /* The table holds the strings while we use them. */
                fields[n].text = t == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
                fields[n].number = t == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
                n++;
            }
            lua_pop(L, 1);
        }
    }
    emit(level_names[level], fields, n, msg);
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

/* core.set_log_format("text" | "json") */
int rb_api_set_log_format(lua_State *L) {
    rb_log_set_format(luaL_checkoption(L, 1, NULL, format_names));
    return 0;
}

/* core.set_access_log(on) */
int rb_api_set_access_log(lua_State *L) {
    rb_log_set_access(lua_toboolean(L, 1));
    return 0;
}

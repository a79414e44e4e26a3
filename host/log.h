/* The logger: one line per event on stderr, with a level, a time stamp and
 * who wrote it, as text or (--log-format json) as one JSON object. Its state
 * (level, format, the worker's number, the access log) is its own; any C
 * file may log, and the Lua API (core.log and friends) sits on top. */
#ifndef RB_LOG_H
#define RB_LOG_H

enum { RB_LOG_DEBUG, RB_LOG_INFO, RB_LOG_WARN, RB_LOG_ERROR, RB_LOG_OFF };
enum { RB_LOG_TEXT, RB_LOG_JSON };

/* A value that goes with a line: text, or a number when text is NULL. In
 * text format it follows the message as key=value; in JSON it is a member. */
typedef struct rb_log_field {
    const char *key;
    const char *text;
    double number;
} rb_log_field;

void rb_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void rb_log_fields(int level, const rb_log_field *fields, int nfields, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
int rb_log_enabled(int level);
void rb_log_set_level(int level);
/* RB_LOG_TEXT (the default) or RB_LOG_JSON. */
void rb_log_set_format(int format);
/* A worker's lines carry its number; -1 (the default) for other processes. */
void rb_log_set_worker(int worker_id);

/* The access log: one line per call served, written whatever the level. */
void rb_log_set_access(int on);
int rb_log_access_enabled(void);
void rb_log_access(const rb_log_field *fields, int nfields);

struct lua_State;
int rb_api_log(struct lua_State *L);
int rb_api_set_log_level(struct lua_State *L);
int rb_api_log_enabled(struct lua_State *L);
int rb_api_set_log_format(struct lua_State *L);
int rb_api_set_access_log(struct lua_State *L);

#endif

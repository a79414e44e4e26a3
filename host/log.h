/* The logger: one line per event on stderr, with a level, a time stamp and
 * who wrote it. Its state (level, the worker's number) is its own; any C
 * file may log, and the Lua API (core.log and friends) sits on top. */
#ifndef RB_LOG_H
#define RB_LOG_H

enum { RB_LOG_DEBUG, RB_LOG_INFO, RB_LOG_WARN, RB_LOG_ERROR, RB_LOG_OFF };

void rb_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int rb_log_enabled(int level);
void rb_log_set_level(int level);
/* A worker's lines carry its number; -1 (the default) for other processes. */
void rb_log_set_worker(int worker_id);

struct lua_State;
int rb_api_log(struct lua_State *L);
int rb_api_set_log_level(struct lua_State *L);
int rb_api_log_enabled(struct lua_State *L);

#endif

/* Line editing for the REPL: GNU readline's callback interface, driven by
 * the loop. While a line is typed the loop keeps running, so the client's
 * connection answers its heartbeats; Ctrl-C (interrupt.c) drops the line
 * instead of the process; Tab asks a Lua function for the candidates; and
 * the history can live in a file, kept across sessions.
 *
 * Readline's state is global, so one line is read at a time. A line is a
 * wait like any other (task.h): inside a task it yields, on the main thread
 * it runs the loop until the line is entered. */
#include "lineedit.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <readline/history.h>
#include <readline/readline.h>

#include "bind.h"
#include "interrupt.h"
#include "lauxlib.h"
#include "log.h"
#include "task.h"

#define DROPPED "line dropped by Ctrl-C"
/* Not "." nor ":": rabi.cl and client:re are one word, completed whole. */
#define WORD_BREAKS " \t\n\"\\'`@$><=;|&{(,+-*/%^~#[]}"

typedef struct {
    rb_wait wait;
    char *line; /* once entered; NULL at the end of input */
    int completer_ref;
    int installed; /* readline's handler is installed */
    int watching;  /* stdin is in the loop */
    int reading;   /* inside rl_callback_read_char */
    int interrupted;
    rb_interrupt_listener listener;
} line_wait;

static line_wait *active;
static char *history_path;
static int history_max;

/* ---- the history ---- */

static void remember(const char *line) {
    if (!*line) return;
    HIST_ENTRY *last = history_length > 0 ? history_get(history_base + history_length - 1) : NULL;
    if (last && strcmp(last->line, line) == 0) return;
    add_history(line);
    if (!history_path) return;
    /* Each line as it is entered, so that a session that dies keeps its
     * lines, and two sessions at once keep both. */
    int err = append_history(1, history_path);
    if (!err) err = history_truncate_file(history_path, history_max);
    if (err) {
        rb_log(RB_LOG_WARN, "cannot write the REPL history to %s: %s; it is no longer kept", history_path,
               strerror(err));
        free(history_path);
        history_path = NULL;
    }
}

/* mkdir -p of path's folder, private to the user: a history holds what was
 * typed, URLs and their passwords included. */
static int make_parents(const char *path) {
    char *dir = strdup(path);
    if (!dir) return -1;
    for (char *p = strchr(dir + 1, '/'); p; p = strchr(p + 1, '/')) {
        *p = '\0';
        if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
            int e = errno;
            free(dir);
            errno = e;
            return -1;
        }
        *p = '/';
    }
    free(dir);
    return 0;
}

/* core.history_file(path [, size]) -> true | nil, err: loads path's lines
 * (at most size, default 1000), and appends each line entered to it from
 * then on, keeping its last size lines. nil keeps no file. */
int rb_api_history_file(lua_State *L) {
    const char *path = luaL_optstring(L, 1, NULL);
    int size = luaL_optint(L, 2, 1000);
    luaL_argcheck(L, size >= 1, 2, "size must be at least 1");
    free(history_path);
    history_path = NULL;
    if (path) {
        if (make_parents(path) < 0)
            return rb_fail(L, "io", "cannot make the folder of %s: %s", path, strerror(errno));
        int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (fd < 0) return rb_fail(L, "io", "cannot open %s: %s", path, strerror(errno));
        close(fd);
        clear_history();
        stifle_history(size);
        int err = read_history(path);
        if (!err) err = history_truncate_file(path, size);
        if (err) return rb_fail(L, "io", "cannot read %s: %s", path, strerror(err));
        history_path = strdup(path);
        if (!history_path) return luaL_error(L, "history_file: out of memory");
        history_max = size;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* ---- completion ---- */

static char **candidates;
static int ncandidates;

static void free_candidates(void) {
    for (int i = 0; i < ncandidates; i++) free(candidates[i]);
    free(candidates);
    candidates = NULL;
    ncandidates = 0;
}

/* Moves the strings of the table on L's top into candidates. */
static void take_candidates(lua_State *L) {
    int n = (int)lua_objlen(L, -1);
    candidates = calloc((size_t)n + 1, sizeof *candidates);
    if (!candidates) return;
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, -1, i);
        const char *s = lua_tostring(L, -1);
        if (s && (candidates[ncandidates] = strdup(s)) != NULL) ncandidates++;
        lua_pop(L, 1);
    }
}

static char *next_candidate(const char *text, int state) {
    static int i;
    (void)text; /* the completer matched them already */
    if (state == 0) i = 0;
    return i < ncandidates ? strdup(candidates[i++]) : NULL;
}

static void on_stdin(rb_loop *loop, int fd, void *data, int mask);

/* The completer gets the word before the cursor and the line up to it, and
 * returns the words that may replace it. Keys wait meanwhile: a completer
 * that asks the broker runs the loop, which must not read them. */
static char **complete(const char *text, int start, int end) {
    (void)start;
    rl_attempted_completion_over = 1; /* never file names */
    rl_completion_suppress_append = 1;
    line_wait *lw = active;
    if (!lw || lw->completer_ref == LUA_NOREF) return NULL;
    lua_State *L = rb_sched_state(lw->wait.sched);
    rb_loop *loop = rb_sched_loop(lw->wait.sched);
    if (!lua_checkstack(L, 4)) return NULL;
    rb_loop_del_file(loop, STDIN_FILENO);
    lua_rawgeti(L, LUA_REGISTRYINDEX, lw->completer_ref);
    lua_pushstring(L, text);
    lua_pushlstring(L, rl_line_buffer, (size_t)end);
    char **matches = NULL;
    if (lua_pcall(L, 2, 1, 0) != 0) {
        rb_log(RB_LOG_DEBUG, "completion failed: %s", lua_tostring(L, -1));
    } else if (lua_istable(L, -1)) {
        take_candidates(L);
        if (ncandidates > 0) matches = rl_completion_matches(text, next_candidate);
        free_candidates();
    }
    lua_pop(L, 1);
    if (lw->watching && rb_loop_add_file(loop, STDIN_FILENO, RB_READABLE, on_stdin, lw) < 0) lw->watching = 0;
    return matches;
}

/* ---- reading a line ---- */

static void stop_reading(line_wait *lw) {
    if (lw->installed) rl_callback_handler_remove();
    if (lw->watching) rb_loop_del_file(rb_sched_loop(lw->wait.sched), STDIN_FILENO);
    rb_interrupt_unlisten(&lw->listener);
    lw->installed = lw->watching = 0;
    if (active == lw) active = NULL;
}

static void on_line(char *line) {
    line_wait *lw = active;
    if (!lw) {
        free(line);
        return;
    }
    stop_reading(lw);
    lw->line = line;
    if (line) remember(line);
    rb_wait_wake(&lw->wait);
}

/* As Python's readline module does on a signal in callback mode. */
static void drop_line(line_wait *lw) {
    rl_echo_signal_char(SIGINT);
    rl_free_line_state();
    rl_callback_sigcleanup();
    rl_cleanup_after_signal();
    fputc('\n', rl_outstream);
    fflush(rl_outstream);
    rb_wait_cancel(&lw->wait, DROPPED);
}

static void on_interrupt(void *data) {
    line_wait *lw = data;
    if (lw->reading)
        lw->interrupted = 1; /* readline is mid-key (a completion): after it */
    else
        drop_line(lw);
}

static void on_stdin(rb_loop *loop, int fd, void *data, int mask) {
    (void)loop, (void)fd, (void)mask;
    line_wait *lw = data;
    lw->reading = 1;
    rl_callback_read_char();
    lw->reading = 0;
    if (lw->interrupted && !lw->wait.woken) drop_line(lw);
}

static int line_push(rb_wait *w, lua_State *L) {
    line_wait *lw = (line_wait *)w;
    if (lw->line)
        lua_pushstring(L, lw->line);
    else
        lua_pushnil(L);
    return 1;
}

static void line_detach(rb_wait *w) {
    stop_reading((line_wait *)w);
}

static void line_release(rb_wait *w) {
    line_wait *lw = (line_wait *)w;
    luaL_unref(rb_sched_state(w->sched), LUA_REGISTRYINDEX, lw->completer_ref);
    free(lw->line);
    free(lw);
}

static const rb_wait_ops line_ops = {line_push, line_detach, line_release, NULL};

static void configure_readline(void) {
    rl_readline_name = "rabihost"; /* for $if rabihost in ~/.inputrc */
    rl_catch_signals = 0;          /* Ctrl-C is interrupt.c's */
    rl_completer_word_break_characters = WORD_BREAKS;
    rl_attempted_completion_function = complete;
}

/* Standard input that epoll cannot watch (a regular file): plain readline. */
static int read_blocking(lua_State *L, const char *prompt) {
    char *line = readline(prompt);
    if (!line) {
        lua_pushnil(L);
        return 1;
    }
    remember(line);
    lua_pushstring(L, line);
    free(line);
    return 1;
}

/* core.readline(prompt [, completer]) -> line | nil at the end of input |
 * nil, err (kind cancelled) when Ctrl-C dropped the line. completer(word,
 * line_before_cursor) -> the words that may replace word. */
int rb_api_readline(lua_State *L) {
    rb_sched *s = rb_sched_of(L);
    const char *prompt = luaL_optstring(L, 1, "> ");
    if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TFUNCTION);
    if (active) return luaL_error(L, "readline: another line is being read");
    configure_readline();
    line_wait *lw = calloc(1, sizeof *lw);
    if (!lw) return luaL_error(L, "readline: out of memory");
    rb_wait_init(&lw->wait, s, &line_ops);
    if (rb_loop_add_file(rb_sched_loop(s), STDIN_FILENO, RB_READABLE, on_stdin, lw) < 0) {
        free(lw);
        return read_blocking(L, prompt);
    }
    lw->watching = 1;
    lw->completer_ref = LUA_NOREF;
    if (!lua_isnoneornil(L, 2)) {
        lua_pushvalue(L, 2);
        lw->completer_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lw->listener = (rb_interrupt_listener){on_interrupt, lw, NULL};
    rb_interrupt_discard();
    rb_interrupt_listen(&lw->listener);
    active = lw;
    rl_callback_handler_install(prompt, on_line);
    lw->installed = 1;
    return rb_wait_for(L, &lw->wait);
}

/* core.interactive() -> whether standard input and output are terminals */
int rb_api_interactive(lua_State *L) {
    lua_pushboolean(L, isatty(STDIN_FILENO) && isatty(STDOUT_FILENO));
    return 1;
}

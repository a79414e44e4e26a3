/* Process-level API: the supervisor that forks and restarts workers, the
 * workers' signal handling, and line editing for the REPL. */
#include <dirent.h>
#include <errno.h>
#include <readline/history.h>
#include <readline/readline.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core.h"
#include "lauxlib.h"

#define MAX_WORKERS 1024

typedef struct {
    pid_t pid;
    uint64_t started_ms;
    uint64_t restart_at_ms; /* 0: not waiting for a restart */
    int quick_deaths;       /* in a row; drives the backoff */
} worker_slot;

static void on_stop_signal(int sig) {
    (void)sig;
    rb_proc.stopping = 1;
}

/* In a worker, SIGTERM/SIGINT ask for a graceful drain. No SA_RESTART, so the
 * loop's epoll_wait returns at once and notices. */
static void install_worker_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
}

static int api_handle_stop_signals(lua_State *L) {
    (void)L;
    install_worker_signals();
    return 0;
}

static void describe_exit(int status, char *buf, size_t len) {
    if (WIFEXITED(status)) snprintf(buf, len, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status)) snprintf(buf, len, "killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    else snprintf(buf, len, "stopped (status 0x%x)", status);
}

static pid_t start_worker(lua_State *L, int fn_idx, int id, int bind_core, const sigset_t *old_mask) {
    fflush(NULL);
    pid_t pid = fork();
    if (pid != 0) return pid;
    /* The child: its own loop, its own signals, then the Lua worker body. */
    rb_proc.worker_id = id;
    sigprocmask(SIG_SETMASK, old_mask, NULL);
    install_worker_signals();
    if (bind_core) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(id % sysconf(_SC_NPROCESSORS_ONLN), &set);
        if (sched_setaffinity(0, sizeof set, &set) < 0)
            rb_log(RB_LOG_WARN, "cannot bind to core %d: %s", id, strerror(errno));
    }
    if (rb_loop_after_fork(rb_get_loop()) < 0) {
        rb_log(RB_LOG_ERROR, "cannot create the worker's event loop: %s", strerror(errno));
        _exit(70);
    }
    lua_pushvalue(L, fn_idx);
    lua_pushinteger(L, id);
    int code = 0;
    if (lua_pcall(L, 1, 1, 0) != 0) {
        rb_log(RB_LOG_ERROR, "worker failed: %s", lua_tostring(L, -1));
        code = 1;
    } else {
        code = (int)luaL_optinteger(L, -1, 0);
    }
    fflush(NULL);
    _exit(code);
}

/* core.supervise{ workers = N, bind_core = bool, worker = function(id) -> exit code }
 * Forks the workers, restarts those that die (after 0.1 s, doubling up to
 * 30 s while they keep dying young), and on SIGTERM/SIGINT forwards SIGTERM
 * and waits for the workers to drain. Returns the supervisor's exit code. */
static int api_supervise(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_getfield(L, 1, "workers");
    lua_getfield(L, 1, "bind_core");
    lua_getfield(L, 1, "worker");
    lua_getfield(L, 1, "drain_timeout");
    int n = (int)luaL_optinteger(L, 2, 1);
    int bind_core = lua_toboolean(L, 3);
    luaL_checktype(L, 4, LUA_TFUNCTION);
    double drain_timeout = luaL_optnumber(L, 5, 30);
    if (n <= 0) n = (int)sysconf(_SC_NPROCESSORS_ONLN);
    luaL_argcheck(L, n <= MAX_WORKERS, 1, "too many workers");
    worker_slot *slots = lua_newuserdata(L, (size_t)n * sizeof *slots);
    memset(slots, 0, (size_t)n * sizeof *slots);

    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigprocmask(SIG_BLOCK, &set, &old);

    for (int i = 0; i < n; i++) {
        slots[i].pid = start_worker(L, 4, i, bind_core, &old);
        slots[i].started_ms = rb_now_ms();
        if (slots[i].pid < 0) slots[i].restart_at_ms = rb_now_ms() + 1000;
    }
    rb_log(RB_LOG_INFO, "supervisor started %d worker%s", n, n == 1 ? "" : "s");

    int stopping = 0, running = n;
    uint64_t kill_at = 0;
    while (!stopping || running > 0) {
        struct timespec tick = {0, 100 * 1000 * 1000};
        int sig = sigtimedwait(&set, NULL, &tick);
        if ((sig == SIGTERM || sig == SIGINT) && !stopping) {
            stopping = 1;
            kill_at = rb_now_ms() + (uint64_t)(drain_timeout * 1000) + 5000;
            rb_log(RB_LOG_INFO, "draining %d worker%s", running, running == 1 ? "" : "s");
            for (int i = 0; i < n; i++)
                if (slots[i].pid > 0) kill(slots[i].pid, SIGTERM);
        }
        int status;
        pid_t pid;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
            for (int i = 0; i < n; i++) {
                if (slots[i].pid != pid) continue;
                slots[i].pid = 0;
                running--;
                char why[96];
                describe_exit(status, why, sizeof why);
                if (stopping) {
                    rb_log(RB_LOG_INFO, "worker %d (pid %d) %s", i, (int)pid, why);
                    break;
                }
                uint64_t now = rb_now_ms();
                slots[i].quick_deaths = now - slots[i].started_ms < 10000 ? slots[i].quick_deaths + 1 : 0;
                int shift = slots[i].quick_deaths < 9 ? slots[i].quick_deaths : 9;
                uint64_t delay = 100u << shift;
                if (delay > 30000) delay = 30000;
                slots[i].restart_at_ms = now + delay;
                rb_log(RB_LOG_WARN, "worker %d (pid %d) %s; restarting in %.1f s", i, (int)pid, why,
                       (double)delay / 1000.0);
            }
        }
        uint64_t now = rb_now_ms();
        for (int i = 0; i < n && !stopping; i++) {
            if (slots[i].pid || !slots[i].restart_at_ms || now < slots[i].restart_at_ms) continue;
            slots[i].restart_at_ms = 0;
            slots[i].started_ms = now;
            slots[i].pid = start_worker(L, 4, i, bind_core, &old);
            if (slots[i].pid > 0) running++;
            else slots[i].restart_at_ms = now + 1000;
        }
        if (stopping && kill_at && now > kill_at) {
            for (int i = 0; i < n; i++)
                if (slots[i].pid > 0) kill(slots[i].pid, SIGKILL);
            kill_at = 0;
        }
    }
    sigprocmask(SIG_SETMASK, &old, NULL);
    lua_pushinteger(L, 0);
    return 1;
}

/* core.readline(prompt) -> line | nil at end of input */
static int api_readline(lua_State *L) {
    const char *prompt = luaL_optstring(L, 1, "> ");
    char *line = readline(prompt);
    if (!line) return 0;
    if (*line) add_history(line);
    lua_pushstring(L, line);
    free(line);
    return 1;
}

/* core.list_dir(path) -> { {name=, dir=bool}, ... } sorted | nil, message */
static int api_list_dir(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    DIR *d = opendir(path);
    if (!d) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", path, strerror(errno));
        return 2;
    }
    lua_newtable(L);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue; /* ., .., and hidden files */
        lua_createtable(L, 0, 2);
        lua_pushstring(L, e->d_name);
        lua_setfield(L, -2, "name");
        lua_pushboolean(L, e->d_type == DT_DIR);
        lua_setfield(L, -2, "dir");
        lua_rawseti(L, -2, ++n);
    }
    closedir(d);
    return 1;
}

void rb_open_process(lua_State *L) {
    lua_pushcfunction(L, api_list_dir);
    lua_setfield(L, -2, "list_dir");
    lua_pushcfunction(L, api_supervise);
    lua_setfield(L, -2, "supervise");
    lua_pushcfunction(L, api_handle_stop_signals);
    lua_setfield(L, -2, "handle_stop_signals");
    lua_pushcfunction(L, api_readline);
    lua_setfield(L, -2, "readline");
}

/* Ctrl-C for the REPL: SIGINT as an event of the loop.
 *
 * The signal handler only writes a byte to a pipe the loop watches (the
 * self-pipe trick), so what a Ctrl-C does runs in the loop, never inside the
 * handler: the line being edited is dropped (lineedit.c listens), and the
 * task evaluating a line (core.interrupt_task) is cancelled, its current and
 * later waits failing with kind "cancelled" as any cancellation does.
 *
 * A task busy in Lua code gives the loop no turn. For it the handler also
 * sets a hook, as lua.c does, that raises "interrupted" in that task's
 * coroutine. Neither code the JIT compiled nor C runs hooks: after three
 * presses that nothing took up, SIGINT gets its default action back and
 * the process ends of it, as it did before the REPL caught it. */
#include "interrupt.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include "bind.h"
#include "lauxlib.h"
#include "loop.h"
#include "task.h"

#define REASON "interrupted by Ctrl-C"
#define PRESSES_BEFORE_DEFAULT 3

static struct {
    int rfd, wfd; /* the self-pipe; -1 while not catching */
    rb_loop *loop;
    lua_State *L; /* the main state: where the hook is set */
    struct sigaction old;
    int target_ref; /* the task handle Ctrl-C cancels, anchored in the registry */
    rb_task *target;
    rb_interrupt_listener *listeners;
} st = {.rfd = -1, .wfd = -1, .target_ref = LUA_NOREF};

static volatile sig_atomic_t unheard;   /* presses no one has taken up */
static lua_State *volatile hook_thread; /* the coroutine the hook may stop */

static void interrupt_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    /* Hooks are per state in LuaJIT: other coroutines run on. */
    if (L != hook_thread) return;
    lua_sethook(L, NULL, 0, 0);
    unheard = 0;
    luaL_error(L, REASON);
}

static void on_sigint(int sig) {
    (void)sig;
    int saved = errno;
    if (++unheard >= PRESSES_BEFORE_DEFAULT) {
        static const char msg[] = "\nrabihost: not responding to Ctrl-C; exiting\n";
        ssize_t n = write(STDERR_FILENO, msg, sizeof msg - 1);
        (void)n;
        signal(SIGINT, SIG_DFL);
        raise(SIGINT);
    }
    if (hook_thread) lua_sethook(st.L, interrupt_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
    ssize_t n = write(st.wfd, "", 1); /* a full pipe already says it */
    (void)n;
    errno = saved;
}

static void drain_pipe(void) {
    char buf[64];
    while (read(st.rfd, buf, sizeof buf) > 0) {
    }
    unheard = 0;
}

/* The loop runs, so cancelling reaches the task: the hook is not needed. */
static void on_pipe(rb_loop *loop, int fd, void *data, int mask) {
    (void)loop, (void)fd, (void)data, (void)mask;
    drain_pipe();
    if (lua_gethook(st.L) == interrupt_hook) lua_sethook(st.L, NULL, 0, 0);
    if (st.target) rb_task_cancel(st.target, REASON);
    for (rb_interrupt_listener *l = st.listeners, *next; l; l = next) {
        next = l->next;
        l->proc(l->data);
    }
}

void rb_interrupt_listen(rb_interrupt_listener *l) {
    l->next = st.listeners;
    st.listeners = l;
}

void rb_interrupt_unlisten(rb_interrupt_listener *l) {
    for (rb_interrupt_listener **p = &st.listeners; *p; p = &(*p)->next) {
        if (*p == l) {
            *p = l->next;
            return;
        }
    }
}

void rb_interrupt_discard(void) {
    if (st.rfd >= 0) drain_pipe();
}

static void set_target(lua_State *L, int idx) {
    hook_thread = NULL;
    luaL_unref(L, LUA_REGISTRYINDEX, st.target_ref);
    st.target_ref = LUA_NOREF;
    st.target = NULL;
    if (idx == 0) return;
    rb_task **h = luaL_checkudata(L, idx, RB_TASK_CLASS);
    if (!*h) luaL_argerror(L, idx, "task handle already released");
    lua_pushvalue(L, idx);
    st.target_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    st.target = *h;
    hook_thread = rb_task_thread(*h);
}

static int start_catching(lua_State *L) {
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) return -1;
    rb_loop *loop = rb_sched_loop(rb_sched_of(L));
    if (rb_loop_add_file(loop, fds[0], RB_READABLE, on_pipe, NULL) < 0) {
        int e = errno;
        close(fds[0]);
        close(fds[1]);
        errno = e;
        return -1;
    }
    st.rfd = fds[0];
    st.wfd = fds[1];
    st.loop = loop;
    st.L = rb_sched_state(rb_sched_of(L));
    unheard = 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &st.old);
    return 0;
}

static void stop_catching(lua_State *L) {
    sigaction(SIGINT, &st.old, NULL);
    set_target(L, 0);
    if (lua_gethook(st.L) == interrupt_hook) lua_sethook(st.L, NULL, 0, 0);
    rb_loop_del_file(st.loop, st.rfd);
    close(st.rfd);
    close(st.wfd);
    st.rfd = st.wfd = -1;
}

/* core.catch_interrupts(on) -> true | nil, err. While on, Ctrl-C does not
 * end the process: it reaches the loop (see the top of this file). */
int rb_api_catch_interrupts(lua_State *L) {
    luaL_checktype(L, 1, LUA_TBOOLEAN);
    int on = lua_toboolean(L, 1);
    if (on && st.rfd < 0 && start_catching(L) < 0)
        return rb_fail(L, "io", "cannot catch Ctrl-C: %s", strerror(errno));
    if (!on && st.rfd >= 0) stop_catching(L);
    lua_pushboolean(L, 1);
    return 1;
}

/* core.interrupt_task(handle | nil): the task Ctrl-C cancels from now on
 * (nil: none). The handle is held until replaced. */
int rb_api_interrupt_task(lua_State *L) {
    set_target(L, lua_isnoneornil(L, 1) ? 0 : 1);
    return 0;
}

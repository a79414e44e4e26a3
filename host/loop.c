/* The event loop. epoll for file events, a binary min-heap for timers, and a
 * list of before-sleep hooks where batched work (acks, deferred resumes) is
 * flushed once per iteration rather than once per message. */
#include "loop.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int mask;
    rb_file_proc *proc;
    void *data;
} file_event;

typedef struct {
    rb_before_sleep_proc *proc;
    void *data;
} before_sleep_hook;

/* A run of the before-sleep hooks in progress; next: the index of the hook
 * it runs next. A hook may run the loop (a blocking call), so runs nest. */
typedef struct hook_walk {
    int next;
    struct hook_walk *outer;
} hook_walk;

struct rb_loop {
    int epfd;
    file_event *files; /* indexed by fd */
    int nfiles;
    rb_timer **heap;
    int nheap, capheap;
    before_sleep_hook *hooks;
    int nhooks, caphooks;
    hook_walk *walks;            /* the runs of the hooks in progress, innermost first */
    int in_step;                 /* rb_loop_run_once is running (a depth: it is re-entrant) */
    before_sleep_hook *deferred; /* once each, before the loop sleeps or its step returns */
    int ndeferred, capdeferred;
    void (*on_wait)(void *data, int waiting);
    void *on_wait_data;
};

uint64_t rb_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

rb_loop *rb_loop_new(void) {
    rb_loop *loop = calloc(1, sizeof *loop);
    if (!loop) return NULL;
    loop->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (loop->epfd < 0) {
        free(loop);
        return NULL;
    }
    return loop;
}

int rb_loop_after_fork(rb_loop *loop) {
    /* An epoll instance is shared across fork: each child needs its own. The
     * parent watches no files, so there is nothing to carry over. */
    close(loop->epfd);
    loop->epfd = epoll_create1(EPOLL_CLOEXEC);
    for (int fd = 0; fd < loop->nfiles; fd++) loop->files[fd] = (file_event){0, NULL, NULL};
    return loop->epfd < 0 ? -1 : 0;
}

int rb_loop_fd(const rb_loop *loop) {
    return loop->epfd;
}

void rb_loop_free(rb_loop *loop) {
    if (!loop) return;
    close(loop->epfd);
    free(loop->files);
    free(loop->heap);
    free(loop->hooks);
    free(loop->deferred);
    free(loop);
}

int rb_loop_add_file(rb_loop *loop, int fd, int mask, rb_file_proc *proc, void *data) {
    if (fd >= loop->nfiles) {
        int n = fd + 64;
        file_event *grown = realloc(loop->files, (size_t)n * sizeof *grown);
        if (!grown) return -1;
        for (int i = loop->nfiles; i < n; i++) grown[i] = (file_event){0, NULL, NULL};
        loop->files = grown;
        loop->nfiles = n;
    }
    struct epoll_event ev = {0};
    ev.events = ((mask & RB_READABLE) ? EPOLLIN : 0) | ((mask & RB_WRITABLE) ? EPOLLOUT : 0);
    ev.data.fd = fd;
    int op = loop->files[fd].mask ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    if (epoll_ctl(loop->epfd, op, fd, &ev) < 0) return -1;
    loop->files[fd] = (file_event){mask, proc, data};
    return 0;
}

void rb_loop_del_file(rb_loop *loop, int fd) {
    if (fd < 0 || fd >= loop->nfiles || !loop->files[fd].mask) return;
    struct epoll_event ev = {0};
    epoll_ctl(loop->epfd, EPOLL_CTL_DEL, fd, &ev);
    loop->files[fd] = (file_event){0, NULL, NULL};
}

/* ---- timers: a min-heap on deadline ---- */

static void heap_swap(rb_loop *loop, int a, int b) {
    rb_timer *t = loop->heap[a];
    loop->heap[a] = loop->heap[b];
    loop->heap[b] = t;
    loop->heap[a]->heap_index = a;
    loop->heap[b]->heap_index = b;
}

static void heap_up(rb_loop *loop, int i) {
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (loop->heap[parent]->deadline_ms <= loop->heap[i]->deadline_ms) break;
        heap_swap(loop, i, parent);
        i = parent;
    }
}

static void heap_down(rb_loop *loop, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < loop->nheap && loop->heap[l]->deadline_ms < loop->heap[m]->deadline_ms) m = l;
        if (r < loop->nheap && loop->heap[r]->deadline_ms < loop->heap[m]->deadline_ms) m = r;
        if (m == i) return;
        heap_swap(loop, i, m);
        i = m;
    }
}

void rb_timer_init(rb_timer *t, rb_timer_proc *proc, void *data) {
    t->deadline_ms = 0;
    t->heap_index = -1;
    t->proc = proc;
    t->data = data;
}

int rb_timer_start(rb_loop *loop, rb_timer *t, double seconds) {
    if (t->heap_index >= 0) rb_timer_stop(loop, t);
    if (loop->nheap == loop->capheap) {
        int cap = loop->capheap ? loop->capheap * 2 : 64;
        rb_timer **grown = realloc(loop->heap, (size_t)cap * sizeof *grown);
        if (!grown) return -1;
        loop->heap = grown;
        loop->capheap = cap;
    }
    if (seconds < 0) seconds = 0;
    t->deadline_ms = rb_now_ms() + rb_ms_of(seconds);
    t->heap_index = loop->nheap;
    loop->heap[loop->nheap++] = t;
    heap_up(loop, t->heap_index);
    return 0;
}

void rb_timer_stop(rb_loop *loop, rb_timer *t) {
    int i = t->heap_index;
    if (i < 0) return;
    int last = --loop->nheap;
    if (i != last) {
        heap_swap(loop, i, last);
        heap_down(loop, i);
        heap_up(loop, i);
    }
    t->heap_index = -1;
}

static int run_due_timers(rb_loop *loop) {
    int n = 0;
    uint64_t now = rb_now_ms();
    while (loop->nheap > 0 && loop->heap[0]->deadline_ms <= now) {
        rb_timer *t = loop->heap[0];
        rb_timer_stop(loop, t);
        t->proc(loop, t->data); /* may re-arm t or free its owner */
        n++;
    }
    return n;
}

/* ---- before-sleep hooks ---- */

/* Appends (proc, data) to a growing array of hooks. */
static int hook_append(before_sleep_hook **hooks, int *n, int *cap, rb_before_sleep_proc *proc, void *data) {
    if (*n == *cap) {
        int grown_cap = *cap ? *cap * 2 : 8;
        before_sleep_hook *grown = realloc(*hooks, (size_t)grown_cap * sizeof *grown);
        if (!grown) return -1;
        *hooks = grown;
        *cap = grown_cap;
    }
    (*hooks)[(*n)++] = (before_sleep_hook){proc, data};
    return 0;
}

int rb_loop_add_before_sleep(rb_loop *loop, rb_before_sleep_proc *proc, void *data) {
    return hook_append(&loop->hooks, &loop->nhooks, &loop->caphooks, proc, data);
}

/* The hooks after it move down one, in order, and each run in progress
 * moves back with them: moving the last hook into the gap instead skipped
 * it for the round when a hook removed one that had already run. */
void rb_loop_del_before_sleep(rb_loop *loop, rb_before_sleep_proc *proc, void *data) {
    for (int i = 0; i < loop->nhooks; i++) {
        if (loop->hooks[i].proc != proc || loop->hooks[i].data != data) continue;
        memmove(&loop->hooks[i], &loop->hooks[i + 1], (size_t)(loop->nhooks - i - 1) * sizeof *loop->hooks);
        loop->nhooks--;
        for (hook_walk *w = loop->walks; w; w = w->outer)
            if (i < w->next) w->next--;
        return;
    }
}

void rb_loop_on_wait(rb_loop *loop, void (*proc)(void *data, int waiting), void *data) {
    loop->on_wait = proc;
    loop->on_wait_data = data;
}

int rb_loop_defer(rb_loop *loop, rb_before_sleep_proc *proc, void *data) {
    if (!loop->in_step) return -1;
    return hook_append(&loop->deferred, &loop->ndeferred, &loop->capdeferred, proc, data);
}

void rb_loop_cancel_deferred(rb_loop *loop, rb_before_sleep_proc *proc, void *data) {
    for (int i = 0; i < loop->ndeferred; i++)
        if (loop->deferred[i].proc == proc && loop->deferred[i].data == data) loop->deferred[i].proc = NULL;
}

int rb_loop_in_step(const rb_loop *loop) {
    return loop->in_step > 0;
}

/* The work deferred so far, taken from the end: what a proc defers, or a
 * nested step runs, while this runs is taken too. What it starts is not
 * deferred again: it runs with in_step down. */
static int run_deferred(rb_loop *loop) {
    int pending = 0;
    loop->in_step--;
    while (loop->ndeferred > 0) {
        before_sleep_hook h = loop->deferred[--loop->ndeferred];
        if (h.proc) pending |= h.proc(loop, h.data);
    }
    loop->in_step++;
    return pending;
}

/* Each hook once, in the order added. A hook may add hooks (they run too)
 * and remove any, itself included (a link closing): walk.next follows. */
static int run_before_sleep(rb_loop *loop) {
    int pending = 0;
    hook_walk walk = {0, loop->walks};
    loop->walks = &walk;
    while (walk.next < loop->nhooks) {
        before_sleep_hook h = loop->hooks[walk.next++];
        pending |= h.proc(loop, h.data);
    }
    loop->walks = walk.outer;
    return pending | run_deferred(loop);
}

/* Events, then due timers, then the work they deferred. */
static int dispatch(rb_loop *loop, const struct epoll_event *events, int n) {
    int handled = 0;
    for (int i = 0; i < n; i++) {
        int fd = events[i].data.fd;
        if (fd >= loop->nfiles || !loop->files[fd].mask) continue; /* removed meanwhile */
        file_event fe = loop->files[fd];
        int mask = 0;
        if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) mask |= RB_READABLE;
        if (events[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) mask |= RB_WRITABLE;
        fe.proc(loop, fd, fe.data, mask & (fe.mask | RB_READABLE));
        handled++;
    }
    handled += run_due_timers(loop);
    run_deferred(loop);
    return handled;
}

int rb_loop_run_once(rb_loop *loop, int timeout_ms) {
    loop->in_step++;
    int handled = run_due_timers(loop);
    if (run_before_sleep(loop) || handled) timeout_ms = 0;
    if (loop->nheap > 0) {
        uint64_t now = rb_now_ms(), due = loop->heap[0]->deadline_ms;
        int until = due <= now ? 0 : (int)(due - now);
        if (timeout_ms < 0 || until < timeout_ms) timeout_ms = until;
    }
    struct epoll_event events[64];
    if (loop->on_wait) loop->on_wait(loop->on_wait_data, 1);
    int n = epoll_wait(loop->epfd, events, 64, timeout_ms);
    if (loop->on_wait) loop->on_wait(loop->on_wait_data, 0);
    if (n < 0) {
        loop->in_step--;
        return errno == EINTR ? handled : -1;
    }
    handled += dispatch(loop, events, n);
    loop->in_step--;
    return handled;
}

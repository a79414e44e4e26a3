/* A queue of deadlines that each lie the same time ahead of the moment they
 * are added (a client's calls with the client's timeout, the gateway's
 * connections with its client timeout): adding appends, which keeps the
 * queue in deadline order, and one timer serves them all. A timer each
 * would cost a heap insert and a heap removal per entry, each touching a
 * dozen others. */
#ifndef RB_DEADLINES_H
#define RB_DEADLINES_H

#include <stddef.h>
#include <stdint.h>

#include "loop.h"

/* Embedded in its owner's struct; rb_deadline_owner finds the owner. */
typedef struct rb_deadline {
    struct rb_deadline *prev, *next;
    uint64_t at_ms; /* rb_now_ms() time */
    int queued;
} rb_deadline;

/* The struct of type `type` whose field `member` is the deadline d. */
#define rb_deadline_owner(d, type, member) ((type *)(void *)((char *)(d)-offsetof(type, member)))

/* Called for each entry whose deadline has passed, already removed. It
 * may add and remove entries, this one included. */
typedef void rb_deadline_proc(rb_deadline *d, void *data);

typedef struct rb_deadline_queue {
    rb_deadline *head, *tail; /* earliest first */
    uint64_t delay_ms;        /* the time ahead of every entry */
    rb_loop *loop;
    rb_timer timer; /* for the head */
    rb_deadline_proc *expired;
    void *data;
} rb_deadline_queue;

void rb_deadlines_init(rb_deadline_queue *q, rb_loop *loop, rb_deadline_proc *expired, void *data);
/* Whether an entry delay_ms ahead keeps q in order: q is empty (it then
 * takes delay_ms as its own), or that is q's delay. For a queue whose
 * entries have several delays; one with a single delay sets q->delay_ms
 * once. */
int rb_deadlines_fit(rb_deadline_queue *q, uint64_t delay_ms);
/* Appends d, due q->delay_ms from now (a queued d moves to the end). -1
 * when the timer could not be armed (no memory): d is not queued. */
int rb_deadlines_add(rb_deadline_queue *q, rb_deadline *d);
/* Takes d out of q (nothing if it is not queued). */
void rb_deadlines_remove(rb_deadline_queue *q, rb_deadline *d);
/* Stops q's timer; its entries stay (their owner takes them out). */
void rb_deadlines_stop(rb_deadline_queue *q);

#endif

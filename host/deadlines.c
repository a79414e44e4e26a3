#include "deadlines.h"

#include <stddef.h>

static void on_tick(rb_loop *loop, void *data);

void rb_deadlines_init(rb_deadline_queue *q, rb_loop *loop, rb_deadline_proc *expired, void *data) {
    q->head = q->tail = NULL;
    q->delay_ms = 0;
    q->loop = loop;
    q->expired = expired;
    q->data = data;
    rb_timer_init(&q->timer, on_tick, q);
}

int rb_deadlines_fit(rb_deadline_queue *q, uint64_t delay_ms) {
    if (!q->head) q->delay_ms = delay_ms;
    return delay_ms == q->delay_ms;
}

static int arm_for_head(rb_deadline_queue *q, uint64_t now) {
    uint64_t at = q->head->at_ms;
    return rb_timer_start(q->loop, &q->timer, at > now ? (double)(at - now) / 1000.0 : 0.0);
}

int rb_deadlines_add(rb_deadline_queue *q, rb_deadline *d) {
    rb_deadlines_remove(q, d);
    uint64_t now = rb_now_ms();
    d->at_ms = now + q->delay_ms;
    d->next = NULL;
    d->prev = q->tail;
    *(q->tail ? &q->tail->next : &q->head) = d;
    q->tail = d;
    d->queued = 1;
    /* An armed timer is for an earlier deadline, or fires for nothing and
     * arms itself again (on_tick): either way it comes in time for d. */
    if (q->timer.heap_index >= 0 || arm_for_head(q, now) == 0) return 0;
    rb_deadlines_remove(q, d);
    return -1;
}

/* The timer stays armed when the head leaves: it fires for nothing at
 * worst, which costs less than a heap removal and insert per entry. */
void rb_deadlines_remove(rb_deadline_queue *q, rb_deadline *d) {
    if (!d->queued) return;
    *(d->prev ? &d->prev->next : &q->head) = d->next;
    *(d->next ? &d->next->prev : &q->tail) = d->prev;
    d->prev = d->next = NULL;
    d->queued = 0;
    if (!q->head) rb_timer_stop(q->loop, &q->timer);
}

void rb_deadlines_stop(rb_deadline_queue *q) {
    rb_timer_stop(q->loop, &q->timer);
}

static void on_tick(rb_loop *loop, void *data) {
    (void)loop;
    rb_deadline_queue *q = data;
    uint64_t now = rb_now_ms();
    rb_deadline *d;
    while ((d = q->head) && d->at_ms <= now) {
        rb_deadlines_remove(q, d);
        q->expired(d, q->data);
    }
    /* No memory to arm it: the next add tries again. */
    if (q->head) (void)arm_for_head(q, now);
}

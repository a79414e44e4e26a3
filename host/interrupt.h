/* Ctrl-C for the REPL: SIGINT as an event of the loop, taken up by whoever
 * listens (the line being edited) or by the task that evaluates a line.
 * Nothing here is installed until core.catch_interrupts(true): serve and
 * run keep SIGINT's usual meaning. */
#ifndef RB_INTERRUPT_H
#define RB_INTERRUPT_H

#include "lua.h"

typedef struct rb_interrupt_listener {
    void (*proc)(void *data);
    void *data;
    struct rb_interrupt_listener *next;
} rb_interrupt_listener;

/* l (owned by the caller, linked in place) hears each Ctrl-C until
 * unlistened. A listener may unlisten itself from its proc. */
void rb_interrupt_listen(rb_interrupt_listener *l);
void rb_interrupt_unlisten(rb_interrupt_listener *l);
/* Forgets the presses no one has taken up yet (one made between two lines
 * must not cancel the next). */
void rb_interrupt_discard(void);

/* Lua API: core.catch_interrupts(on), core.interrupt_task(handle | nil) */
int rb_api_catch_interrupts(lua_State *L);
int rb_api_interrupt_task(lua_State *L);

#endif

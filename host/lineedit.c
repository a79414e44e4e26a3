/* Line editing for the REPL: GNU readline, with its history. */
#include "lineedit.h"

#include <stdio.h>
#include <stdlib.h>

#include <readline/history.h>
#include <readline/readline.h>

#include "lauxlib.h"

/* core.readline(prompt) -> line | nil at end of input */
int rb_api_readline(lua_State *L) {
    const char *prompt = luaL_optstring(L, 1, "> ");
    char *line = readline(prompt);
    if (!line) return 0;
    if (*line) add_history(line);
    lua_pushstring(L, line);
    free(line);
    return 1;
}

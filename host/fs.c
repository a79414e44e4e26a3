/* The file system as the loader of service scripts needs it. */
#include "fs.h"

#include <dirent.h>
#include <errno.h>
#include <string.h>

#include "bind.h"

/* core.list_dir(path) -> { {name=, dir=bool}, ... } | nil, error */
int rb_api_list_dir(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    DIR *d = opendir(path);
    if (!d) return rb_fail(L, "io", "%s: %s", path, strerror(errno));
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

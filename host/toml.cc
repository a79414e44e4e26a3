/* TOML config files (RabiBridge's config/env.toml): toml++ parses, and this
 * file only turns its tree into Lua values. Built as C++17 because no
 * maintained TOML parser for C or Lua ships in Debian.
 *
 * Built with C++ exceptions on: a Lua error raised here (out of memory)
 * unwinds through these frames as one, and the parsed tree is freed.
 * TOML_EXCEPTIONS 0 only selects toml++'s result-returning parse API. */
#define TOML_EXCEPTIONS 0
#include <toml++/toml.h>

#include <cstdint>
#include <cstdio>
#include <sstream>
#include <string>

#include "lua.hpp"

/* Beyond 2^53 a double loses digits: such an integer becomes an int64_t
 * cdata, made by LuaJIT's own parser from its exact literal. */
static void push_integer(lua_State *L, int64_t v) {
    const int64_t exact = (int64_t)1 << 53;
    if (v >= -exact && v <= exact) {
        lua_pushnumber(L, (lua_Number)v);
        return;
    }
    char chunk[48];
    snprintf(chunk, sizeof chunk, "return %lldLL", (long long)v);
    if (luaL_loadstring(L, chunk) != 0 || lua_pcall(L, 0, 1, 0) != 0) {
        lua_pop(L, 1); /* a LuaJIT without FFI: the nearest double */
        lua_pushnumber(L, (lua_Number)v);
    }
}

/* Dates and times have no Lua type: their TOML text (RFC 3339). */
template <typename T> static void push_as_text(lua_State *L, const T &value) {
    std::ostringstream out;
    out << value;
    const std::string s = out.str();
    lua_pushlstring(L, s.data(), s.size());
}

static void push_node(lua_State *L, const toml::node &node);

static void push_table(lua_State *L, const toml::table &t) {
    lua_createtable(L, 0, (int)t.size());
    for (auto &&[key, value] : t) {
        lua_pushlstring(L, key.str().data(), key.str().size());
        push_node(L, value);
        lua_rawset(L, -3);
    }
}

/* Arrays carry the codecs' array metatable, so that an empty one stays an
 * array when a setting is printed as JSON. */
static void push_array(lua_State *L, const toml::array &a) {
    lua_createtable(L, (int)a.size(), 0);
    int i = 0;
    for (const toml::node &value : a) {
        push_node(L, value);
        lua_rawseti(L, -2, ++i);
    }
    luaL_getmetatable(L, "rabibridge.array_mt");
    if (lua_istable(L, -1))
        lua_setmetatable(L, -2);
    else
        lua_pop(L, 1);
}

static void push_node(lua_State *L, const toml::node &node) {
    /* toml++ bounds the nesting (TOML_MAX_NESTED_VALUES), so does this. */
    luaL_checkstack(L, 4, "TOML nested too deeply");
    switch (node.type()) {
    case toml::node_type::table: push_table(L, *node.as_table()); break;
    case toml::node_type::array: push_array(L, *node.as_array()); break;
    case toml::node_type::string: {
        const std::string &s = node.as_string()->get();
        lua_pushlstring(L, s.data(), s.size());
        break;
    }
    case toml::node_type::integer: push_integer(L, node.as_integer()->get()); break;
    case toml::node_type::floating_point: lua_pushnumber(L, node.as_floating_point()->get()); break;
    case toml::node_type::boolean: lua_pushboolean(L, node.as_boolean()->get()); break;
    case toml::node_type::date: push_as_text(L, node.as_date()->get()); break;
    case toml::node_type::time: push_as_text(L, node.as_time()->get()); break;
    case toml::node_type::date_time: push_as_text(L, node.as_date_time()->get()); break;
    default: lua_pushnil(L); break;
    }
}

/* core.toml_decode(text [, name]) -> table | nil, "name:LINE:COLUMN: what" */
static int api_toml_decode(lua_State *L) {
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    const char *name = luaL_optstring(L, 2, "TOML");
    toml::parse_result parsed = toml::parse(std::string_view(text, len));
    if (!parsed) {
        const toml::parse_error &err = parsed.error();
        const std::string_view what = err.description();
        lua_pushnil(L);
        lua_pushfstring(L, "%s:%d:%d: ", name, (int)err.source().begin.line, (int)err.source().begin.column);
        lua_pushlstring(L, what.data(), what.size());
        lua_concat(L, 2);
        return 2;
    }
    push_table(L, parsed.table());
    return 1;
}

extern "C" void rb_open_toml(lua_State *L) {
    lua_pushcfunction(L, api_toml_decode);
    lua_setfield(L, -2, "toml_decode");
}

-- rabibridge for LuaJIT: the Lua modules and their C core rabibridge.core,
-- plus the rabihost command. Built by the project's Makefile (its CORE_SRC
-- and LIBS list the C sources and libraries once, for make and for this
-- rock alike: a new source file is one line there, none here).
--
--   luarocks make --tree=TREE
--
-- The C core is compiled against LuaJIT's own headers, found through the
-- LUAJIT external dependency, never LUA_INCDIR: Debian's luarocks pulls in
-- PUC Lua 5.1's headers and points LUA_INCDIR at them, and they lack
-- LuaJIT's extensions (lua_isyieldable and the FFI's).
rockspec_format = "3.0"
package = "rabibridge"
version = "0.1.0-1"
source = {
  -- This checkout: luarocks make builds the tree it is run in. There is no
  -- published release yet; `luarocks pack` or a release URL goes here then.
  url = ".",
}
description = {
  summary = "RPC over RabbitMQ for LuaJIT, wire-compatible with the Python RabiBridge",
  detailed = [[
Serve Lua functions as RPC over RabbitMQ and call them, from LuaJIT or the
rabihost command: each function is a queue, calls are RabiBridge's wire
format (json or msgpack, zstd-compressed when large), so Python RabiBridge
clients and servers interoperate.]],
  license = "Apache-2.0",
  labels = { "rpc", "rabbitmq", "amqp", "luajit" },
}
dependencies = {
  "lua == 5.1", -- LuaJIT
}
external_dependencies = {
  RABBITMQ = { header = "amqp.h", library = "rabbitmq" },
  ZSTD = { header = "zstd.h", library = "zstd" },
  OPENSSL = { header = "openssl/ssl.h", library = "ssl" },
  MSGPACK = { header = "msgpack.h", library = "msgpackc" },
  READLINE = { header = "readline/readline.h", library = "readline" },
  MICROHTTPD = { header = "microhttpd.h", library = "microhttpd" },
  TOMLPLUSPLUS = { header = "toml++/toml.h" }, -- header-only
  LUAJIT = { header = "luajit-2.1/luajit.h", library = "luajit-5.1" },
}
build = {
  type = "make",
  build_target = "all",
  build_variables = {
    CFLAGS = "$(CFLAGS)",
    LUAJIT_INC = "$(LUAJIT_INCDIR)/luajit-2.1",
  },
  install_target = "install",
  install_variables = {
    PREFIX = "$(PREFIX)",
    BINDIR = "$(BINDIR)",
    LUA_LIBDIR = "$(LIBDIR)",
    LUA_SHAREDIR = "$(LUADIR)",
    MANDIR = "$(PREFIX)/doc/man",
    HINT = "no",
  },
}

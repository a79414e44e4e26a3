-- rabibridge for LuaJIT: the Lua modules and their C core rabibridge.core,
-- plus the rabihost command. Built by the project's Makefile (its CORE_SRC
-- and LIBS list the C sources and libraries once, for make and for this
-- rock alike: a new source file is one line there, none here).
--
--   luarocks --lua-version=5.1 make LUA_INCDIR=/usr/include/luajit-2.1
--
-- LUA_INCDIR: Debian's luarocks finds PUC Lua 5.1's headers first; the C
-- core is meant for LuaJIT's (they share the 5.1 API).
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
  LUAJIT = { header = "luajit-2.1/luajit.h", library = "luajit-5.1" },
}
build = {
  type = "make",
  build_target = "all",
  build_variables = {
    CFLAGS = "$(CFLAGS)",
    LUAJIT_INC = "$(LUA_INCDIR)",
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

-- The smallest client: run it against `make run` with
--   build/rabihost run examples/hello.lua 2 3
-- (or plain `luajit examples/hello.lua` once `make install` has run).
local rabi = require "rabibridge"

local a, b = tonumber(arg and arg[1]) or 2, tonumber(arg and arg[2]) or 3
local client = rabi.client { timeout = 10 }:connect()
print(("add(%g, %g) = %s"):format(a, b, client:remote_call("add", { a, b })))
print("fibonacci(50) = " .. client.fn.fibonacci(50))
print(client:remote_call("greet", {}, { name = "Lua", greeting = "Hi" }))
client:close()

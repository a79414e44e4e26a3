-- The benchmark's echo: the same work as bench/bare_echo_server.c (reply
-- [0, args[1]]), served by rabihost.
local rabi = require "rabibridge"

rabi.register_call("bench_echo", { fetch_size = 256 }, function(x) return x end)

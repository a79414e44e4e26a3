-- Returns its arguments: the benchmark's service, and handy to see how values
-- travel (arrays, objects, null, unicode, large payloads).
local rabi = require "rabibridge"

rabi.register_call("echo", { fetch_size = 256 }, function(...) return ... end)

-- The eight-function benchmark: the echo of bench/services/bench_echo.lua
-- under eight names (bench_echo_1 .. bench_echo_8), served by one worker.
local rabi = require "rabibridge"

for i = 1, 8 do
  rabi.register_call("bench_echo_" .. i, { fetch_size = 256 }, function(x) return x end)
end

-- Calls side by side: each rabi.spawn runs a call in its own coroutine, and
-- rabi.wait collects them. Ten one-second calls take about one second, not
-- ten, as long as the service's fetch_size lets them run together.
--   build/rabihost run examples/concurrent.lua [N]
local rabi = require "rabibridge"

local n = tonumber(arg and arg[1]) or 10
local client = rabi.client { timeout = 30 }:connect()

local started = rabi.now()
local tasks = {}
for i = 1, n do
  tasks[i] = rabi.spawn(function() return client:remote_call("sleep", { 1 }) end)
end
for i, t in ipairs(tasks) do
  local ok, result = rabi.wait(t)
  print(i, ok, tostring(result))
end
print(("%d one-second calls in %.2f s"):format(n, rabi.now() - started))
client:close()

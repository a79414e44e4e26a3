-- The Lua client under load: W tasks (rabi.spawn), each calling in a loop,
-- so W calls are in flight, as bench_client.c keeps W in flight.
--   build/rabihost run bench/lua_client.lua URL NAME CALLS WINDOW [PAYLOAD] > result.json
local rabi = require "rabibridge"

local url, name = arg[1], arg[2]
local calls, window, payload = tonumber(arg[3]), tonumber(arg[4]), tonumber(arg[5] or "1")
-- json: the bare C echo server reads only JSON, and the C client sends it,
-- so both clients send the same bytes to every server.
local client = rabi.client { url = url, timeout = 30, serialiser = "json" }:connect()
local body = string.rep("x", payload)

local function run(n)
  local latencies, failed = {}, 0
  local per_task = math.ceil(n / window)
  local tasks = {}
  for w = 1, window do
    tasks[w] = rabi.spawn(function()
      for _ = 1, per_task do
        local t0 = rabi.now()
        local ok, code = client:try_remote_call(name, { body })
        if ok and code == 0 then latencies[#latencies + 1] = rabi.now() - t0 else failed = failed + 1 end
      end
    end)
  end
  for _, t in ipairs(tasks) do rabi.wait(t) end
  return latencies, failed, per_task * window
end

run(math.min(math.floor(calls / 10), 1000)) -- warm-up
local cpu0, t0 = os.clock(), rabi.now()
local latencies, failed, done = run(calls)
local seconds, cpu = rabi.now() - t0, os.clock() - cpu0
table.sort(latencies)
local function pct(p)
  if #latencies == 0 then return 0 end
  return latencies[math.max(1, math.ceil(#latencies * p))] * 1e6
end
io.stdout:write(('{"calls": %d, "window": %d, "payload": %d, "seconds": %.4f, "calls_per_s": %.1f, '
  .. '"p50_us": %.0f, "p99_us": %.0f, "failed": %d, "client_cpu_s": %.3f}\n')
  :format(done, window, payload, seconds, done / seconds, pct(0.5), pct(0.99), failed, cpu))
client:close()

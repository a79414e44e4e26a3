-- A service that calls other services. rabi.client() with no arguments uses
-- this worker's own connection settings; its calls yield, so the worker goes
-- on serving while they wait, and several run side by side with rabi.spawn.
local rabi = require "rabibridge"

local client -- one per worker, connected on first use
local function get_client()
  if not client then client = rabi.client { timeout = 10 }:connect() end
  return client
end

rabi.register_call("sum_of_squares", { fetch_size = 64, params = { "numbers:table" }, validate = true },
  function(numbers)
    local c = get_client()
    local tasks = {}
    for i, x in ipairs(numbers) do
      tasks[i] = rabi.spawn(function() return c:remote_call("add", { 0, x * x }) end)
    end
    local total = 0
    for _, t in ipairs(tasks) do
      local ok, v = rabi.wait(t)
      if not ok then error(v, 0) end
      total = total + v
    end
    return total
  end)

rabi.register_call("greet", { params = { "name:string", "greeting:string?" }, validate = true },
  function(name, greeting)
    return ("%s, %s!"):format(greeting or "Hello", name)
  end)

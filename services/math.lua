-- The quick start of the Python RabiBridge, in Lua.
local rabi = require "rabibridge"

rabi.register_call("add", { queue_size = 10000, fetch_size = 128, timeout = 10,
                            validate = true, params = { "a:number", "b:number" } },
  function(a, b) return a + b end)

local function fib(n)
  if n < 2 then return n end
  local a, b = 0, 1
  for _ = 2, n do a, b = b, a + b end
  return b
end

rabi.register_call("fibonacci", { fetch_size = 64, validate = true, params = { "n:integer" } },
  function(n)
    if n < 0 or n > 1476 then error("n must be between 0 and 1476 (larger overflows a double)") end
    return fib(n)
  end)

-- What can go wrong, and how it looks. Every error is a value with a `kind`:
-- remote, timeout, queue_full, no_route, connection, invalid_argument.
--   build/rabihost run examples/errors.lua
local rabi = require "rabibridge"

local client = rabi.client { timeout = 5 }:connect()

local function try(label, fn)
  local ok, err = pcall(fn)
  if ok then
    print(label, "ok")
  else
    print(label, rabi.is_error(err) and err.kind or "?", err.message or tostring(err))
  end
end

try("remote error  ", function() return client:remote_call("fibonacci", { -1 }) end)
try("bad argument  ", function() return client:remote_call("add", { 1, "two" }) end)
try("no such func  ", function() return client:remote_call("no_such_function", {}) end)
try("timeout       ", function() return client:remote_call("sleep", { 3 }, nil, nil, { timeout = 0.5 }) end)
try("invalid arg   ", function() return client:remote_call("add", "not a table") end)

-- try_remote_call never raises: success, err_code, result.
local success, err_code, result = client:try_remote_call("add", { 2, 2 })
print("try_remote_call", success, err_code, result)
success, err_code, result = client:try_remote_call("fibonacci", { -1 })
print("try_remote_call", success, err_code, (tostring(result):match("^[^\n]*")))
success, err_code, result = client:try_remote_call("no_such_function")
print("try_remote_call", success, err_code, result.kind)

client:close()
try("after close   ", function() return client:remote_call("add", { 1, 2 }) end)

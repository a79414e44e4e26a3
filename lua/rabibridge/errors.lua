-- Errors are values: tables with a `kind`, a `message`, and for remote
-- errors the remote `traceback`. tostring() gives one readable line (plus the
-- remote traceback), so an uncaught error still says what happened.
-- The C bindings return the same values (nil, err): their metatable is
-- core.error_mt, filled here.
local core = require "rabibridge.core"

local M = {}

local Error = core.error_mt
Error.__index = Error
Error.__tostring = function(e)
  local s = "rabibridge." .. e.kind .. ": " .. e.message
  if e.traceback and e.traceback ~= "" and e.traceback ~= e.message then
    s = s .. "\n" .. e.traceback
  end
  return s
end

M.kinds = {
  remote = true, timeout = true, queue_full = true, no_route = true,
  connection = true, invalid_argument = true, protocol = true,
  cancelled = true, -- the wait was cancelled: a drain ran out of time, or the caller's deadline passed
  broker = true,    -- the broker refused an operation (a queue declared with other arguments)
  io = true,        -- a local file or folder could not be read
}

function M.new(kind, message, fields)
  local e = { kind = kind, message = message }
  if fields then
    for k, v in pairs(fields) do e[k] = v end
  end
  return setmetatable(e, Error)
end

function M.is_error(v)
  return getmetatable(v) == Error
end

function M.raise(kind, message, fields)
  error(M.new(kind, message, fields), 0)
end

return M

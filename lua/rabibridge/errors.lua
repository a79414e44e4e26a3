--- Errors are values: tables with a kind, a message, and for remote
-- errors the remote traceback. tostring() gives one readable line (plus the
-- remote traceback), so an uncaught error still says what happened.
--
-- An error value has the fields kind (one of kinds), message (a string),
-- and, where they apply, func (the remote function's name), traceback
-- (the remote traceback, for kind remote) and trace_id (the W3C trace id the
-- call carried, which the server's log lines for it show). rabi.errors is
-- this module.
-- @module rabibridge.errors

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

--- The kinds of error, each a key set to true.
-- @table kinds
-- @field remote the remote function raised (RabiBridge's RemoteExecutionError),
-- or refused its arguments (its params)
-- @field timeout no reply within the call's timeout
-- @field queue_full the function's queue is full (its queue_size): refused at once
-- @field no_route no such function is served
-- @field connection not connected, the broker cannot be reached, or the
-- connection dropped during the call
-- @field invalid_argument a bad argument to the call itself, or a value that
-- cannot be sent; also a config that cannot be used
-- @field protocol a reply that is not RabiBridge's format (for example a
-- peer with another serialiser)
-- @field cancelled the wait was cancelled: the worker is draining and its
-- `--drain-timeout` ran out, or the deadline of the call a handler serves
-- passed while it waited (a sleep, a nested call, a spawned task)
-- @field broker the broker refused an operation (a queue declared with other
-- arguments)
-- @field io a local file, folder or system call failed
-- @field not_accepted the connection (or the client's channel) was lost
-- before the broker confirmed the request: the broker never took charge of
-- it, so the call may be sent again (`connection` is a call the broker had
-- accepted, whose reply was lost)
M.kinds = {
  remote = true, timeout = true, queue_full = true, no_route = true,
  connection = true, invalid_argument = true, protocol = true,
  cancelled = true, broker = true, io = true, not_accepted = true,
}

--- Makes an error value.
-- @tparam string kind one of kinds
-- @tparam string message what happened
-- @tparam[opt] table fields more fields, copied into the error (func, traceback...)
-- @treturn table the error value
function M.new(kind, message, fields)
  local e = { kind = kind, message = message }
  if fields then
    for k, v in pairs(fields) do e[k] = v end
  end
  return setmetatable(e, Error)
end

--- Whether v is an error value.
-- @param v any value
-- @treturn boolean
function M.is_error(v)
  return getmetatable(v) == Error
end

--- Raises an error value (at level 0: the message carries no position).
-- @tparam string kind one of kinds
-- @tparam string message what happened
-- @tparam[opt] table fields more fields
-- @raise the error value, always
function M.raise(kind, message, fields)
  error(M.new(kind, message, fields), 0)
end

return M

-- The trace a piece of code works for: the traceparent of the call a
-- handler serves, kept by the task that serves it (host/task.c), so that
-- the calls it makes continue that trace (same trace id, a new span id
-- each) and its log lines carry the trace id. The server gives a call's
-- task its trace, and a task spawned inherits its spawner's. Code outside
-- any call (a script, the REPL) has none: each of its calls starts a trace
-- of its own.
local core = require "rabibridge.core"

local M = {}

-- -> the traceparent of the running task's call, or nil
M.current = core.trace_current

-- Sets (or with nil clears) the running task's traceparent; code outside
-- a task keeps none.
M.set = core.trace_set

-- The trace id of a traceparent ("00-<trace id>-<span id>-<flags>").
function M.id(traceparent)
  return traceparent and traceparent:sub(4, 35)
end

-- The span id of a traceparent.
function M.span(traceparent)
  return traceparent and traceparent:sub(37, 52)
end

return M

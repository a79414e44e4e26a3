-- The trace a piece of code works for: the traceparent of the call a
-- handler serves, kept per coroutine, so that the calls it makes continue
-- that trace (same trace id, a new span id each) and its log lines carry
-- the trace id. Code outside any call (a script, the REPL) has none: each
-- of its calls starts a trace of its own.
local core = require "rabibridge.core"

local M = {}

local running = coroutine.running
-- Weak keys: a finished coroutine takes its entry along.
local of = setmetatable({}, { __mode = "k" })

-- -> the traceparent of the running coroutine's call, or nil
function M.current()
  local co = running()
  return co and of[co]
end

-- Sets (or with nil clears) the running coroutine's traceparent; the main
-- thread keeps none.
function M.set(traceparent)
  local co = running()
  if co then of[co] = traceparent end
end

-- The traceparent for a new request: the current trace continued, or a new one.
function M.next()
  return core.traceparent(M.current())
end

-- The trace id of a traceparent ("00-<trace id>-<span id>-<flags>").
function M.id(traceparent)
  return traceparent and traceparent:sub(4, 35)
end

-- The span id of a traceparent.
function M.span(traceparent)
  return traceparent and traceparent:sub(37, 52)
end

return M

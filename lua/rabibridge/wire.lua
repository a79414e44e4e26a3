-- RabiBridge's naming rule, in one place for the Lua layer: a function
-- NAME of type FTYPE is published with the routing key "FTYPE_NAME" and
-- served from the queue queue_prefix .. "FTYPE_NAME". The names themselves
-- come from host/wire.h through core.wire.
local core = require "rabibridge.core"

local M = {}

for k, v in pairs(core.wire) do M[k] = v end

-- -> the routing key of a function
function M.routing_key(ftype, name)
  return ftype .. "_" .. name
end

-- -> the queue a function is served from
function M.queue(ftype, name)
  return core.wire.queue_prefix .. ftype .. "_" .. name
end

return M

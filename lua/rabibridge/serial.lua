-- Serialisation of requests ([args, kwargs]) and replies ([err_code, result])
-- as RabiBridge does it, with json or msgpack. Both codecs are C (host/json.c,
-- host/msgpack.c): they keep arrays and maps apart, empty ones included,
-- and they are the hot path of every call. Compression is below, in C too.
local core = require "rabibridge.core"

local M = {}

local null, array_mt = core.null, core.array_mt
M.null = null
M.array_mt = array_mt

local next, type, pcall, select, pairs, tostring = next, type, pcall, select, pairs, tostring
local setmetatable, getmetatable = setmetatable, getmetatable

local function is_array(t)
  if getmetatable(t) == array_mt then return true end
  for k in pairs(t) do
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then return false end
  end
  return true
end
M.is_array = is_array

-- pair(code, encoded): the reply [code, value] around an encoded value,
-- written as bytes so that the hot path builds no table for it.
local RAW = {
  json = { encode = core.json_encode, decode = core.json_decode,
           pair = function(code, v) return "[" .. code .. "," .. v .. "]" end,
           request = function(a, k) return "[" .. a .. "," .. k .. "]" end },
  msgpack = { encode = core.msgpack_encode, decode = core.msgpack_decode,
              pair = function(code, v) return "\146" .. string.char(code) .. v end,
              request = function(a, k) return "\146" .. a .. k end },
}

local EMPTY_ARRAY, EMPTY_MAP = setmetatable({}, array_mt), {}

local codecs = {}

-- -> codec | nil, message. A codec's functions never raise.
function M.get(name)
  name = name or "json"
  if codecs[name] then return codecs[name] end
  local raw = RAW[name]
  if not raw then return nil, ("unknown serialiser '%s' (expected json or msgpack)"):format(tostring(name)) end
  local encode, decode, pair, request = raw.encode, raw.decode, raw.pair, raw.request
  local c = { name = name, encode = encode, decode = decode }

  -- -> body | nil, message
  function c.encode_request(args, kwargs)
    if args == nil or next(args) == nil then
      args = EMPTY_ARRAY
    elseif not is_array(args) then
      return nil, "args must be an array (a table with keys 1..n)"
    end
    if kwargs ~= nil and next(kwargs) ~= nil then
      for k in pairs(kwargs) do
        if type(k) ~= "string" then return nil, "kwargs must be a table with string keys" end
      end
    else
      kwargs = EMPTY_MAP
    end
    local a, err = encode(args)
    if not a then return nil, "cannot serialise the arguments: " .. err end
    local k, kerr = encode(kwargs)
    if not k then return nil, "cannot serialise the keyword arguments: " .. kerr end
    return request(a, k)
  end

  -- -> args, kwargs | nil, message
  function c.decode_request(body)
    local req, err = decode(body)
    if req == nil then return nil, "malformed request body: " .. err end
    if type(req) ~= "table" or getmetatable(req) ~= array_mt or #req ~= 2 then
      return nil, "malformed request: expected [args, kwargs]"
    end
    local args, kwargs = req[1], req[2]
    if args == null then args = {} end
    if kwargs == null then kwargs = {} end
    if type(args) ~= "table" or (next(args) ~= nil and getmetatable(args) ~= array_mt) then
      return nil, "malformed request: args must be an array"
    end
    if type(kwargs) ~= "table" or (next(kwargs) ~= nil and getmetatable(kwargs) == array_mt) then
      return nil, "malformed request: kwargs must be an object"
    end
    return args, kwargs
  end

  local function encode_error(message)
    return pair(1, encode(tostring(message)))
  end
  c.encode_error = encode_error

  function c.encode_result(...)
    local result = ...
    local n = select("#", ...)
    if n > 1 then
      -- Several return values travel as an array, like a Python tuple.
      result = setmetatable({ ... }, array_mt)
      for i = 1, n do
        if result[i] == nil then result[i] = null end
      end
    elseif result == nil then
      result = null
    end
    local body, err = encode(result)
    if not body then return encode_error("cannot serialise the result: " .. err) end
    return pair(0, body)
  end

  -- -> true, result | false, message (err_code 1) | nil, protocol error
  function c.decode_reply(body)
    local rep, err = decode(body)
    if rep == nil then return nil, "malformed reply body: " .. err end
    if type(rep) ~= "table" or (rep[1] ~= 0 and rep[1] ~= 1) then
      return nil, "malformed reply: expected [err_code, result]"
    end
    local result = rep[2]
    if rep[1] == 1 then return false, result end
    -- A top-level null is a function that returned nothing: nil in Lua.
    -- Nested nulls stay rabi.null, since nil cannot live in a table.
    if result == null then result = nil end
    return true, result
  end

  codecs[name] = c
  return c
end

local json = M.get("json")
M.encode = function(v) local s, err = json.encode(v) if s == nil then error(err, 0) end return s end
M.decode = function(s) local v, err = json.decode(s) if v == nil then error(err, 0) end return v end

return M

-- Serialisation of requests ([args, kwargs]) and replies ([err_code, result])
-- as RabiBridge does it. Compression is below this layer, in C.
local core = require "rabibridge.core"

local M = {}

-- The codec is C (host/json.c): it keeps [] and {} apart, which Debian's
-- lua-cjson 2.1 cannot, and it is the hot path of every call.
local json_encode, json_decode = core.json_encode, core.json_decode
local json = { null = core.null, array_mt = core.array_mt }
if not json_encode then -- TEMPORARY until host/json.c lands
  local cj = require "cjson"
  json_encode = function(v) local ok, s = pcall(cj.encode, v) if ok then return s end return nil, s end
  json_decode = function(v) local ok, s = pcall(cj.decode, v) if ok then return s end return nil, s end
  json = { null = cj.null, array_mt = {} }
end

M.null = json.null
M.array_mt = json.array_mt
M.empty_array = setmetatable({}, json.array_mt)

-- Both raise on failure, for the pcall-based callers below.
local function encode(v)
  local s, err = json_encode(v)
  if s == nil then error(err, 0) end
  return s
end
local function decode(s)
  local v, err = json_decode(s)
  if err ~= nil then error(err, 0) end
  return v
end

local next, type, pcall, select = next, type, pcall, select

local function is_array(t)
  if getmetatable(t) == json.array_mt then return true end
  local n = 0
  for k in pairs(t) do
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then return false end
    n = n + 1
  end
  return true, n
end
M.is_array = is_array

-- Encodes a Lua array of arguments; nil holes become null.
local function encode_args(args)
  if args == nil or next(args) == nil then return "[]" end
  if getmetatable(args) == json.array_mt then return encode(args) end
  local ok = is_array(args)
  if not ok then return nil, "args must be an array (a table with keys 1..n)" end
  return encode(args)
end

local function encode_kwargs(kwargs)
  if kwargs == nil or next(kwargs) == nil then return "{}" end
  for k in pairs(kwargs) do
    if type(k) ~= "string" then return nil, "kwargs must be a table with string keys" end
  end
  return encode(kwargs)
end

function M.encode_request(args, kwargs)
  local ok, a, err = pcall(encode_args, args)
  if not ok then return nil, "cannot serialise args: " .. tostring(a) end
  if not a then return nil, err end
  local ok2, k, err2 = pcall(encode_kwargs, kwargs)
  if not ok2 then return nil, "cannot serialise kwargs: " .. tostring(k) end
  if not k then return nil, err2 end
  return "[" .. a .. "," .. k .. "]"
end

-- -> args, kwargs | nil, error message
function M.decode_request(body)
  local ok, req = pcall(decode, body)
  if not ok then return nil, "malformed request body: " .. tostring(req) end
  if type(req) ~= "table" or (req[1] == nil and req[2] == nil) then
    return nil, "malformed request: expected [args, kwargs]"
  end
  local args, kwargs = req[1], req[2]
  if args == nil or args == json.null then args = {} end
  if kwargs == nil or kwargs == json.null then kwargs = {} end
  if type(args) ~= "table" or (next(args) ~= nil and getmetatable(args) ~= json.array_mt) then
    return nil, "malformed request: args must be an array"
  end
  if type(kwargs) ~= "table" or (next(kwargs) ~= nil and getmetatable(kwargs) == json.array_mt) then
    return nil, "malformed request: kwargs must be an object"
  end
  return args, kwargs
end

local function encode_error(message)
  return "[1," .. encode(tostring(message)) .. "]"
end
M.encode_error = encode_error

function M.encode_result(...)
  local result = ...
  if select("#", ...) > 1 then
    -- Several return values travel as an array, like a Python tuple.
    result = setmetatable({ ... }, json.array_mt)
    for i = 1, select("#", ...) do
      if result[i] == nil then result[i] = json.null end
    end
  end
  if result == nil then return "[0,null]" end
  local ok, s = pcall(encode, result)
  if not ok then return encode_error("cannot serialise the result: " .. tostring(s)) end
  return "[0," .. s .. "]"
end

-- -> true, result | false, message (err_code 1) | nil, protocol error
function M.decode_reply(body)
  local ok, rep = pcall(decode, body)
  if not ok then return nil, "malformed reply body: " .. tostring(rep) end
  if type(rep) ~= "table" or (rep[1] ~= 0 and rep[1] ~= 1) then
    return nil, "malformed reply: expected [err_code, result]"
  end
  if rep[1] == 0 then
    -- A top-level null is a function that returned nothing: nil in Lua.
    -- Nested nulls stay rabi.null, since nil cannot live in a table.
    local result = rep[2]
    if result == json.null then result = nil end
    return true, result
  end
  return false, rep[2]
end

M.encode = encode
M.decode = decode

return M

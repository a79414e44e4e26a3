-- Serialisation of requests ([args, kwargs]) and replies ([err_code, result])
-- as RabiBridge does it, with msgpack (its default, and a client's here) or
-- json. Both codecs are C (host/json.c, host/msgpack.c): they keep arrays and
-- maps apart, empty ones included, and they are the hot path of every call.
-- Compression is below, in C too. A server takes either: detect() tells them
-- apart by the first byte of a request.
local core = require "rabibridge.core"

local M = {}

local null, array_mt = core.null, core.array_mt
M.null = null
M.array_mt = array_mt

local next, type, pcall, select, pairs, tostring = next, type, pcall, select, pairs, tostring
local setmetatable, getmetatable = setmetatable, getmetatable
local byte = string.byte

M.default = "msgpack" -- RabiBridge's default serialiser

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
           result = core.json_result, call_args = core.json_call_args, encode_request = core.json_request,
           reply = core.json_reply,
           pair = function(code, v) return "[" .. code .. "," .. v .. "]" end },
  msgpack = { encode = core.msgpack_encode, decode = core.msgpack_decode,
              result = core.msgpack_result, call_args = core.msgpack_call_args,
              encode_request = core.msgpack_request,
              reply = core.msgpack_reply,
              pair = function(code, v) return "\146" .. string.char(code) .. v end },
}

local utf8_check = core.utf8_check

-- Text any codec can carry: bytes that are not UTF-8 become U+FFFD, as
-- Python's errors="replace" does. For error messages, which must reach
-- the caller whatever a handler put in them.
local function as_text(s)
  local ok, at = utf8_check(s)
  while not ok do
    s = s:sub(1, at - 1) .. "\239\191\189" .. s:sub(at + 1)
    ok, at = utf8_check(s)
  end
  return s
end
M.as_text = as_text

local codecs = {}

-- A reply in the other serialiser (a peer set to another one) says so,
-- rather than leaving a decoder's "unexpected byte" to be puzzled over.
local function mismatch_hint(name, body)
  local b = byte(body, 1)
  local other
  if name == "json" and b and ((b >= 0x90 and b <= 0x9F) or b == 0xDC or b == 0xDD) then
    other = "msgpack"
  elseif name == "msgpack" and body:match("^%s*%[") then
    other = "json"
  end
  if not other then return "" end
  return ("; the reply looks like %s and this client speaks %s: give both sides the same serialiser"
    .. " (--serialiser, app.serialiser, or rabi.client{ serialiser = })"):format(other, name)
end

-- -> codec | nil, message. A codec's functions never raise.
function M.get(name)
  name = name or M.default
  if codecs[name] then return codecs[name] end
  local raw = RAW[name]
  if not raw then return nil, ("unknown serialiser '%s' (expected json or msgpack)"):format(tostring(name)) end
  local encode, decode, pair = raw.encode, raw.decode, raw.pair
  local c = { name = name, encode = encode, decode = decode }
  -- call_args(body) -> true, args... | false: a request with no kwargs,
  -- its args on the stack with no table (top-level nulls as nil); false for
  -- any other, which decode_request judges. nil for a codec without one.
  c.call_args = raw.call_args

  -- (args, kwargs) -> body | nil, message: args an array (holes go as
  -- nulls), kwargs a table with string keys; nil for none.
  c.encode_request = raw.encode_request

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
    return pair(1, encode(as_text(tostring(message))))
  end
  c.encode_error = encode_error

  local result_of = raw.result -- [0, result] in one pass, or nil, message
  function c.encode_result(...)
    if result_of then
      local body, err = result_of(...)
      if not body then return encode_error(err) end
      return body
    end
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
    local body, err = encode(result, "result")
    if not body then return encode_error(err) end
    return pair(0, body)
  end

  -- -> true, result | false, message (err_code 1) | nil, protocol error
  local reply_of = raw.reply -- code, result of a plain [code, result] reply, or false
  function c.decode_reply(body)
    if reply_of then
      local code, result = reply_of(body)
      if code == 0 then
        if result == null then result = nil end
        return true, result
      end
      if code == 1 then return false, result end
    end
    local rep, err = decode(body)
    if rep == nil then return nil, "malformed reply body: " .. err .. mismatch_hint(name, body) end
    if type(rep) ~= "table" or (rep[1] ~= 0 and rep[1] ~= 1) then
      return nil, "malformed reply: expected [err_code, result]" .. mismatch_hint(name, body)
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

-- ---- what a server receives ----

local JSON_SPACE = { [0x20] = true, [0x09] = true, [0x0A] = true, [0x0D] = true }

-- What a body that is no request looks like, from its first bytes.
local function looks_like(body, i)
  local b, b2 = byte(body, i, i + 1)
  if not b then return #body == 0 and "is empty" or "is only whitespace" end
  local at = ("starts with 0x%02x"):format(b)
  if b == 0x80 and b2 and b2 >= 2 and b2 <= 5 then
    return at .. (" 0x%02x: pickle, which RabiBridge can be set to and rabihost does not speak"):format(b2)
  elseif (b >= 0x80 and b <= 0x8F) or b == 0xDE or b == 0xDF then return at .. ": a msgpack map"
  elseif b >= 0x90 and b <= 0x9F then return at .. (": a msgpack array of %d"):format(b - 0x90)
  elseif b == 0xDC or b == 0xDD then return at .. ": a msgpack array of more than 15"
  elseif (b >= 0xA0 and b <= 0xBF) or (b >= 0xD9 and b <= 0xDB) then return at .. ": a msgpack string"
  elseif b >= 0xC4 and b <= 0xC6 then return at .. ": msgpack bytes"
  elseif b == 0x7B then return "starts with '{': a JSON object"
  elseif b == 0x22 then return "starts with '\"': a JSON string"
  elseif b == 0x2D or (b >= 0x30 and b <= 0x39) then return ("starts with '%s': a JSON number"):format(string.char(b))
  elseif b >= 0x20 and b < 0x7F then return ("is text starting with %q"):format(body:sub(i, i + 11))
  end
  return at
end

local codec_json, codec_msgpack

-- The codec of a request body (decompressed): RabiBridge sends [args,
-- kwargs], an array of two, which is 0x92 in msgpack and '[' in JSON.
-- -> codec | nil, message for the error reply
function M.detect(body)
  local b = byte(body, 1)
  if b == 0x92 then return codec_msgpack end
  if b == 0x5B then return codec_json end
  local i = 1
  while JSON_SPACE[b] do
    i = i + 1
    b = byte(body, i)
  end
  if b == 0x5B then return codec_json end
  return nil, ("malformed request: the body %s; a request is [args, kwargs], an array of two:"
    .. " 0x92 in msgpack, '[' in json"):format(looks_like(body, i))
end

-- ---- what a client receives ----

-- The message of an error reply's text. A Python server sends its whole
-- traceback, whose last exception is the message (ValueError: boom),
-- after the indented frames; a Lua server's text starts with it.
function M.remote_message(text)
  text = tostring(text)
  if not text:find("^Traceback %(most recent call last%):\n") then return (text:match("^[^\n]*")) end
  local last
  for pos in text:gmatch("()Traceback %(most recent call last%):\n") do last = pos end
  for line_start, line in text:sub(last):gmatch("\n()([^\n]*)") do
    if line:match("^%S") then
      local rest = text:sub(last + line_start - 1)
      return (rest:gsub("%s+$", ""))
    end
  end
  return (text:match("^[^\n]*"))
end

codec_json, codec_msgpack = M.get("json"), M.get("msgpack")
local json = codec_json
M.encode = function(v) local s, err = json.encode(v) if s == nil then error(err, 0) end return s end
M.decode = function(s) local v, err = json.decode(s) if v == nil then error(err, 0) end return v end

return M

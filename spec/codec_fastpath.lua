-- The codecs' one-pass paths (issue 16) against what they stand in for, for
-- spec/json_spec.lua and spec/msgpack_spec.lua: both check the same things
-- the same way. A codec is { encode =, decode =, array =, null = }, its
-- core functions and an array maker; each spec keeps its own framing and
-- its own bodies.
local F = {}

local assert = require "luassert"
local unpack = unpack

-- encode_result as it was: one value as is, several as an array (nil as
-- null), none as null; the result's bytes framed by frame.
function F.old_result(codec, frame)
  return function(...)
    local result, n = ..., select("#", ...)
    if n > 1 then
      result = codec.array { ... }
      for i = 1, n do if result[i] == nil then result[i] = codec.null end end
    elseif result == nil then
      result = codec.null
    end
    local body, err = codec.encode(result, "result")
    if not body then return nil, err end
    return frame(body)
  end
end

-- [args, kwargs] as it was written: each encoded, then joined by join.
function F.old_request(codec, join)
  return function(args, kwargs)
    local a, err = codec.encode(args, "args")
    if not a then return nil, err end
    local k, kerr = codec.encode(kwargs, "kwargs")
    if not k then return nil, kerr end
    return join(a, k)
  end
end

-- The results the old and the one-pass encoder are both checked on
-- ({ n =, ... }: the handler's return values); failures end in an error.
function F.result_cases(codec)
  local array, null = codec.array, codec.null
  local deep = {}
  local t = deep
  for _ = 1, 1100 do t[1] = {}; t = t[1] end
  return {
    { n = 0 }, { n = 1 }, { n = 1, 1 }, { n = 1, "x" }, { n = 2, 1, "two" }, { n = 3, nil, 2, nil },
    { n = 2, nil, nil }, { n = 1, { a = array { 1, null } } }, { n = 1, array {} }, { n = 1, {} },
    { n = 2, { 1, 2 }, { b = false } }, { n = 1, 0.1 }, { n = 1, null },
  }, { { n = 1, print }, { n = 2, 1, { x = print } }, { n = 1, deep }, { n = 2, 1, deep } }
end

-- The same for requests ({ n = 2, args, kwargs }).
function F.request_cases(codec)
  local array, null = codec.array, codec.null
  return {
    { n = 2, array {}, {} }, { n = 2, array { 1, "x", null }, { a = 1 } },
    { n = 2, array { { b = array { 1, 2 } } }, { c = { d = "e" } } },
    { n = 2, array { 0.1, -0.0, true, false }, { ["k"] = array {} } },
  }, {
    { n = 2, array { print }, {} }, { n = 2, array { 1, { x = print } }, {} }, { n = 2, array {}, { k = print } },
    { n = 2, array { print }, { k = print } }, { n = 2, array {}, { k = array { 1, { [print] = 1 } } } },
  }
end

-- new gives what old gives for every case (compared through show: hex for
-- binary), and for every failure both give nil and the same error.
function F.assert_same(old, new, cases, fails, show)
  show = show or tostring
  for i, c in ipairs(cases) do
    assert.are.equal(show(old(unpack(c, 1, c.n))), show(new(unpack(c, 1, c.n))), "case " .. i)
  end
  for i, c in ipairs(fails) do
    local want_s, want_err = old(unpack(c, 1, c.n))
    local s, err = new(unpack(c, 1, c.n))
    assert.is_nil(want_s)
    assert.is_nil(s)
    assert.are.equal(want_err, err, "failure " .. i)
  end
end

-- decode_reply as it was: the whole body decoded. -> ok, result, or
-- "malformed", why
local function general_reply(codec, body)
  local rep, err = codec.decode(body)
  if rep == nil then return "malformed", err end
  if type(rep) ~= "table" or (rep[1] ~= 0 and rep[1] ~= 1) then return "malformed", "shape" end
  local result = rep[2]
  if rep[1] == 1 then return false, result end
  if result == codec.null then result = nil end
  return true, result
end

-- Each body read by decode_reply (the serialiser's) as general_reply reads it.
function F.assert_replies(codec, decode_reply, bodies)
  for i, body in ipairs(bodies) do
    local want_ok, want = general_reply(codec, body)
    local ok, got = decode_reply(body)
    if want_ok == "malformed" then
      assert.is_nil(ok, "body " .. i)
      assert.is_string(got)
    else
      assert.are.equal(want_ok, ok, "body " .. i)
      assert.are.same(want, got, "body " .. i)
    end
  end
end

return F

-- The value matrix of spec/interop_spec.lua, shared with the Lua services
-- it calls (spec/fixtures/interop/values.lua loads this file with dofile).
--
-- Each case is one value, as Lua sends it (lua) and as Python sends it (py,
-- a Python literal for spec/tools/py_peer.py), with what the other side
-- must see:
--   canon     what Python receives from Lua's value (py_peer's canon())
--   desc      what Lua receives from Python's value (desc() below)
--   lua_back  desc() of Lua's value after a round trip through Python
--             (default: desc(lua))
--   py_back   canon() of Python's value after a round trip through Lua
--             (default: what Python sent)
--   error     the client-side error Lua's value gets instead (its JSON
--             cannot carry it)
-- A field named FIELD_json or FIELD_msgpack holds for that serialiser only;
-- py_json = false (or py_msgpack) where Python itself cannot send the value
-- with that serialiser (bytes in JSON, a lone surrogate in msgpack).
local rabi = require "rabibridge"

local M = {}

local null, array_mt = rabi.null, getmetatable(rabi.array {})

-- Every Lua value with its type: 1 and 1LL and "1" differ, -0.0 shows.
local function desc(v)
  if v == nil then return "nil" end
  if v == null then return "null" end
  local t = type(v)
  if t == "number" then
    if v ~= v then return "nan" end
    if v == 0 and 1 / v < 0 then return "-0.0" end
    if v % 1 == 0 and v > -2 ^ 63 and v < 2 ^ 63 then return ("%.0f"):format(v) end
    return ("%.17g"):format(v)
  elseif t == "string" then
    return 's"' .. v:gsub('[^\32-\126]', function(c) return ("\\x%02x"):format(c:byte()) end) .. '"'
  elseif t == "table" then
    local parts = {}
    if getmetatable(v) == array_mt then
      for i = 1, #v do parts[i] = desc(v[i]) end
      return "[" .. table.concat(parts, ",") .. "]"
    end
    for k, x in pairs(v) do parts[#parts + 1] = desc(k) .. "=" .. desc(x) end
    table.sort(parts)
    return "{" .. table.concat(parts, ",") .. "}"
  end
  return tostring(v) -- booleans; cdata as 12LL or 12ULL
end
M.desc = desc

local function A(t) return setmetatable(t, array_mt) end

local NOT_JSON = "cannot serialise a string that is not UTF%-8 as JSON %(byte 1 is 0x%x%x%) at args%[1%]"

M.cases = {
  { name = "small integer", lua = 42, py = "42", canon = "int(42)", desc = "42" },
  { name = "negative integer", lua = -7, py = "-7", canon = "int(-7)", desc = "-7" },
  { name = "2^53", lua = 2 ^ 53, py = "2**53", canon = "int(9007199254740992)", desc = "9007199254740992" },
  { name = "2^53+1", lua = 9007199254740993LL, py = "2**53+1", canon = "int(9007199254740993)",
    desc = "9007199254740993LL" },
  { name = "2^63-1", lua = 9223372036854775807LL, py = "2**63-1", canon = "int(9223372036854775807)",
    desc = "9223372036854775807LL" },
  { name = "-2^63", lua = -9223372036854775807LL - 1, py = "-2**63", canon = "int(-9223372036854775808)",
    desc = "-9223372036854775808LL" },
  { name = "2^64-1", lua = 18446744073709551615ULL, py = "2**64-1", canon = "int(18446744073709551615)",
    desc = "18446744073709551615ULL" },
  -- a double: an int to Python, which sends it back as one
  { name = "2^60 as a Lua number", lua = 2 ^ 60, py = "2**60", canon = "int(1152921504606846976)",
    desc = "1152921504606846976LL", lua_back = "1152921504606846976LL" },
  { name = "2^63 as a Lua number", lua = 2 ^ 63, canon = "int(9223372036854775808)",
    lua_back = "9223372036854775808ULL" },
  { name = "a fraction", lua = 1.5, py = "1.5", canon = "float(1.5)", desc = "1.5" },
  { name = "0.1", lua = 0.1, py = "0.1", canon = "float(0.1)", desc = "0.10000000000000001" },
  { name = "-0.0", lua = -0.0, py = "-0.0", canon = "float(-0.0)", desc = "-0.0" },
  -- Lua has one number for 1.0 and 1: Python's 1.0 comes back as 1
  { name = "an integral float", py = "1.0", desc = "1", py_back = "int(1)" },
  { name = "1e20", lua = 1e20, py = "1e20", canon = "float(1e+20)", desc = "1e+20" },
  { name = "NaN", lua = 0 / 0, py = "nan", canon = "float(nan)", desc = "nan" },
  { name = "infinity", lua = math.huge, py = "inf", canon = "float(inf)", desc = "inf" },
  { name = "-infinity", lua = -math.huge, py = "-inf", canon = "float(-inf)", desc = "-inf" },
  -- beyond 64 bits JSON gives a double; Python's msgpack cannot pack it
  { name = "2^64", py = "2**64", py_msgpack = false, desc = "1.8446744073709552e+19",
    py_back = "float(1.8446744073709552e+19)" },
  { name = "UTF-8 text", lua = "héllo 🐢", py = "'héllo 🐢'", canon = "str('h\\xe9llo \\U0001f422')",
    desc = 's"h\\xc3\\xa9llo \\xf0\\x9f\\x90\\xa2"' },
  { name = "an empty string", lua = "", py = "''", canon = "str('')", desc = 's""' },
  { name = "control characters", lua = "a\0b\n", py = "'a\\x00b\\n'", canon = "str('a\\x00b\\n')",
    desc = 's"a\\x00b\\x0a"' },
  { name = "bytes that are not UTF-8", lua = "\255\254", py = "b'\\xff\\xfe'", py_json = false,
    canon_msgpack = "bytes(fffe)", error_json = NOT_JSON, desc = 's"\\xff\\xfe"' },
  -- a Lua string cannot say it was bytes: UTF-8 goes back as str
  { name = "bytes that are UTF-8", py = "b'abc'", py_json = false, desc = 's"abc"', py_back = "str('abc')" },
  { name = "a lone surrogate", lua = "\237\160\128", py = "'\\ud800'", py_msgpack = false,
    canon_json = "str('\\ud800')", canon_msgpack = "bytes(eda080)", desc = 's"\\xed\\xa0\\x80"' },
  { name = "an overlong form", lua = "\192\128", canon_msgpack = "bytes(c080)", error_json = NOT_JSON },
  { name = "a code point above U+10FFFF", lua = "\244\144\128\128", canon_msgpack = "bytes(f4908080)",
    error_json = NOT_JSON },
  { name = "nested arrays and maps", lua = { a = A { 1, 2, { b = null } } }, py = "{'a': [1, 2, {'b': None}]}",
    canon = "{str('a'): [int(1), int(2), {str('b'): None}]}", desc = '{s"a"=[1,2,{s"b"=null}]}' },
  { name = "an empty array", lua = A {}, py = "[]", canon = "[]", desc = "[]" },
  { name = "an empty map", lua = {}, py = "{}", canon = "{}", desc = "{}" },
  { name = "true", lua = true, py = "True", canon = "True", desc = "true" },
  { name = "false", lua = false, py = "False", canon = "False", desc = "false" },
  -- a top-level null is nil in Lua, so that a default applies
  { name = "a top-level null", lua = null, py = "None", canon = "None", desc = "nil", lua_back = "nil" },
  { name = "number keys", lua = { [10] = "x", [1.5] = true }, canon = "{str('1.5'): True, str('10'): str('x')}",
    lua_back = '{s"1.5"=true,s"10"=s"x"}' },
  { name = "an array with keys", lua = { 1, x = 2 }, canon = "{str('1'): int(1), str('x'): int(2)}",
    lua_back = '{s"1"=1,s"x"=2}' },
  -- Python's int keys (msgpack only) reach Lua as numbers and come back as strings
  { name = "int keys", py = "{5: 'a'}", py_json = false, desc = '{5=s"a"}', py_back = "{str('5'): str('a')}" },
  { name = "a nested array with a hole", lua = { 1, nil, 3 }, canon = "[int(1), None, int(3)]",
    lua_back = "[1,null,3]" },
}

-- The field of case c for a serialiser: FIELD_serialiser, else FIELD.
function M.field(c, name, serialiser)
  local v = c[name .. "_" .. serialiser]
  if v == nil then v = c[name] end
  return v
end

-- Whether Python can send case c with that serialiser.
function M.py_sends(c, serialiser)
  return c.py ~= nil and c["py_" .. serialiser] ~= false
end

function M.find(name)
  for _, c in ipairs(M.cases) do
    if c.name == name then return c end
  end
end

-- Makes bodies long enough (> 1024 bytes) to be zstd-compressed both ways.
M.pad = ("pad "):rep(500)

return M

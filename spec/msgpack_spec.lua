-- The msgpack codec of rabibridge.core (host/msgpack.c), byte by byte where
-- a Python peer (msgpack.packb / unpackb at their defaults) depends on it.
-- No broker needed. Run: luajit /usr/bin/busted spec/msgpack_spec.lua
local core = require "rabibridge.core"

local encode, decode = core.msgpack_encode, core.msgpack_decode
local null, array_mt = core.null, core.array_mt

local function array(t) return setmetatable(t or {}, array_mt) end
local F = require "codec_fastpath"
local C = { encode = encode, decode = decode, array = array, null = null }

local function hex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

local function unhex(h)
  return (h:gsub("%s", ""):gsub("%x%x", function(x) return string.char(tonumber(x, 16)) end))
end

local function encode_error(value, root)
  local s, err = encode(value, root)
  assert.is_nil(s)
  assert.is_string(err)
  return err
end

describe("msgpack", function()
  it("round-trips nested structures, keeping arrays and maps apart", function()
    local value = {
      name = "rabi", count = 3, ratio = 0.25, ok = true, off = false,
      list = array { 1, "two", array { 3, array {} }, { four = 4 } },
      map = { deep = { deeper = { deepest = "yes" } } }, empty = {},
    }
    local back = decode(assert(encode(value)))
    assert.are.same(value, back)
    assert.are.equal(array_mt, getmetatable(back.list[3][2]))
    assert.is_nil(getmetatable(back.empty))
    assert.are.equal("92 90 80", hex(encode(array { array(), {} })):gsub("(%x%x)", "%1 "):sub(1, -2))
  end)

  it("writes null and nil as nil, and reads nil as rabi.null", function()
    assert.are.equal("c0", hex(encode(null)))
    assert.are.equal("93 01 c0 03", hex(encode({ 1, nil, 3 })):gsub("(%x%x)", "%1 "):sub(1, -2))
    assert.are.equal(null, decode("\192"))
  end)

  it("sends strict UTF-8 as str and anything else as bin", function()
    assert.are.equal("a2c3a9", hex(encode("é")))
    assert.are.equal("a4f09f90a2", hex(encode("🐢")))
    assert.are.equal("a4f48fbfbf", hex(encode("\244\143\191\191"))) -- U+10FFFF
    -- what Python refuses as str: overlong forms, surrogates, beyond U+10FFFF, stray bytes
    for _, bytes in ipairs { "\192\128", "\224\128\128", "\237\160\128", "\237\191\191", "\244\144\128\128",
                             "\255", "\128", "a\195" } do
      local out = encode(bytes)
      assert.are.equal("c4", hex(out:sub(1, 1)), hex(bytes))
      assert.are.equal(bytes, decode(out))
    end
    -- a long string takes str 8 (as Python writes it), and bin reads back too
    assert.are.equal("d920", hex(encode(("x"):rep(32)):sub(1, 2)))
    assert.are.equal("\1\2", decode(unhex("c4 02 01 02")))
  end)

  it("writes integral numbers up to 2^63 as integers, -0.0 and fractions as float64", function()
    assert.are.equal("cf1000000000000000", hex(encode(2 ^ 60)))
    assert.are.equal("d38000000000000000", hex(encode(-2 ^ 63)))
    assert.are.equal("cf8000000000000000", hex(encode(2 ^ 63)))
    assert.are.equal("03", hex(encode(3)))
    assert.are.equal("ff", hex(encode(-1)))
    assert.are.equal("cb8000000000000000", hex(encode(-0.0)))
    assert.are.equal("cb3ff8000000000000", hex(encode(1.5)))
    assert.are.equal("cb43f0000000000000", hex(encode(2 ^ 64)))
    assert.are.equal("cb7ff0000000000000", hex(encode(math.huge)))
    local nan = decode(encode(0 / 0))
    assert.is_true(nan ~= nan)
    assert.are.equal(-math.huge, 1 / decode(encode(-0.0)))
  end)

  it("decodes integers a double cannot hold to 64-bit cdata, and writes them back unchanged", function()
    local cases = {
      { "cf 0020000000000001", 9007199254740993LL }, { "cf 7fffffffffffffff", 9223372036854775807LL },
      { "d3 8000000000000000", -9223372036854775807LL - 1 }, { "cf ffffffffffffffff", 18446744073709551615ULL },
      { "d3 ffdfffffffffffff", -9007199254740993LL },
    }
    for _, c in ipairs(cases) do
      local bytes = unhex(c[1])
      local v = decode(bytes)
      assert.are.equal("cdata", type(v))
      assert.is_true(v == c[2], c[1])
      assert.are.equal(tostring(c[2]), tostring(v))
      assert.are.equal(hex(bytes), hex(encode(v)))
    end
    assert.are.equal("number", type(decode(unhex("cf 0020000000000000"))))
    assert.are.equal(-2 ^ 53, decode(unhex("d3 ffe0000000000000")))
    assert.are.equal("cd0100", hex(encode(256LL)))
    assert.are.equal("fb", hex(encode(-5LL)))
    assert.are.equal("d0c0", hex(encode(-64LL)))
    assert.matches("type cdata", encode_error(require("ffi").new("double", 1)))
  end)

  it("writes every table key as a string, numbers as the JSON codec does", function()
    -- Python's unpackb refuses integer keys by default (strict_map_key).
    assert.are.same({ ["1"] = "a", ["10"] = "b" }, decode(encode({ [1] = "a", [10] = "b" })))
    assert.are.same({ ["1.5"] = true }, decode(encode({ [1.5] = true })))
    assert.are.same({ ["1"] = 1, x = 2 }, decode(encode({ 1, x = 2 })))
    assert.are.same({ ["9007199254740993"] = 1 }, decode(encode({ [9007199254740993LL] = 1 })))
    -- a sparse table is a map, a dense one with holes an array with nils
    assert.are.equal("81a23130", hex(encode({ [10] = 1 })):sub(1, 8))
    assert.are.equal("92c002", hex(encode({ [2] = 2 })))
    assert.matches("cannot serialise a table key of type boolean at args%[1%]$",
      encode_error({ { [true] = 1 } }, "args"))
  end)

  it("reads a 64-bit integer map key as its decimal string", function()
    assert.are.same({ ["18446744073709551615"] = 1 }, decode(unhex("81 cf ffffffffffffffff 01")))
    assert.are.same({ [7] = 1 }, decode(unhex("81 07 01")))
  end)

  it("names where a value it cannot write sits", function()
    assert.are.equal("cannot serialise a value of type function at args[2].name",
      encode_error({ 1, { name = print } }, "args"))
    assert.are.equal("cannot serialise a value of type function at result",
      encode_error(print, "result"))
    assert.are.equal("cannot serialise a value of type thread", encode_error(coroutine.create(print)))
    local t = {}
    t.self = t
    assert.matches("nesting deeper than 1000 %(a cycle%?%) at %.self%.self", encode_error(t))
  end)

  it("refuses malformed input with a message, never raising", function()
    for _, h in ipairs { "", "92 01", "c1", "d4 00 00", "a3 61 62", "dc ff ff", "df 7f ff ff ff", "c4 05 00",
                         "81 80 01", "01 02" } do
      local ok, v, err = pcall(decode, unhex(h))
      assert.is_true(ok, h)
      assert.is_nil(v, h)
      assert.is_string(err, h)
    end
    assert.matches("trailing bytes", select(2, decode("\1\2")))
    assert.matches("extension types", select(2, decode(unhex("d4 00 00"))))
    assert.matches("nesting deeper than 1000", select(2, decode(("\145"):rep(1001) .. "\192")))
    assert.matches("expects a string", select(2, decode(42)))
  end)

  -- The dispatcher's fast path for a function without params: what it
  -- takes must give the handler what decode_request and bind give it, and
  -- everything else must be left to them (false).
  it("msgpack_call_args decodes plain requests as decode_request and bind do, and leaves the rest", function()
    local serial = require "rabibridge.serial"
    local service = require "rabibridge.service"
    local codec = serial.get("msgpack")
    local spec = { name = "f" }
    local function packed(...) return { n = select("#", ...), ... } end
    local function req(args, kwargs) return assert(codec.encode_request(args, kwargs)) end
    local plain = {
      req(), req({ 1 }), req({ "x" }), req({ null }), req({ 1, null }), req({ null, 2, null }),
      req({ { a = array { null, {} } }, array {}, {} }), req({ "a\"b", 1.5, -0.0, true, false, 2 ^ 60 }),
      req({ array { null } }), req({ ("y"):rep(300) }), req({ "\255" }),
      "\146\220\0\2\1\2\128", "\146\221\0\0\0\1\192\128", -- args as array 16 and array 32
    }
    local many = {}
    for i = 1, 20 do many[i] = i end
    plain[#plain + 1] = req(many)
    for _, body in ipairs(plain) do
      local got = packed(core.msgpack_call_args(body))
      assert.is_true(got[1], hex(body))
      local args, kwargs = codec.decode_request(body)
      local argv, n = service.bind(spec, args, kwargs)
      assert.are.equal(n, got.n - 1, hex(body))
      for i = 1, n do assert.are.same(argv[i], got[i + 1], hex(body)) end
    end
    local huge = {}
    for i = 1, 9000 do huge[i] = 1 end
    local others = {
      "", "\146", "\146\144", req() .. "\0", "\147\144\128\1", "\146\128\128", "\146\192\128", "\146\144\144",
      "\146\144\192", req({ 1 }, { a = 1 }), "\146\145\193\128", "\146\146\1\128", "\146\159\1\128",
      "\146\144\222\0\0", "\146\220\0", "\145\144", "\128", "[[],{}]", req(huge),
      "\146\145" .. ("\145"):rep(1100) .. "\192" .. "\128",
    }
    for _, body in ipairs(others) do
      assert.are.same({ n = 1, false }, packed(core.msgpack_call_args(body)), hex(body))
    end
    assert.are.same({ n = 1, false }, packed(core.msgpack_call_args(nil)))
    assert.are.same({ n = 1, false }, packed(core.msgpack_call_args(12)))
  end)

  it("msgpack_result writes [0, result] as encode_result would from one value, several or none", function()
    local cases, fails = F.result_cases(C)
    cases[#cases + 1] = { n = 1, "\255" } -- bytes as sent
    fails[#fails + 1] = { n = 3, 1, 2, print }
    fails[#fails + 1] = { n = 1, { [print] = 1 } }
    F.assert_same(F.old_result(C, function(body) return "\146\0" .. body end), core.msgpack_result, cases, fails, hex)
  end)

  it("msgpack_request writes [args, kwargs] as encoding each and joining them would", function()
    local cases, fails = F.request_cases(C)
    F.assert_same(F.old_request(C, function(a, k) return "\146" .. a .. k end), core.msgpack_request, cases, fails)
  end)

  it("decode_reply reads plain replies through msgpack_reply as through msgpack_decode", function()
    local serial = require "rabibridge.serial"
    F.assert_replies(C, serial.get("msgpack").decode_reply, {
      "\146\0\1", "\146\1\161x", "\146\0\192", "\146\1\192", "\146\0\144", "\146\0\128", "\146\0\129\161a\146\1\192",
      "\145\0", "\146\2\1", "\147\0\1\2", "\146\204\0\1", "\146\0", "\146\0\1\0", "\128", "\192", "", "\146\0\193",
      "\146\0" .. ("\145"):rep(1100) .. "\192", "[0,1]",
    })
  end)
end)

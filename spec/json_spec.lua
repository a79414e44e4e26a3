-- The JSON codec of rabibridge.core (host/json.c): what the wire protocol
-- relies on ([] and {} kept apart, null, exact numbers) and how it fails.
-- No broker needed. Run: luajit /usr/bin/busted spec/json_spec.lua
local core = require "rabibridge.core"
assert(core.json_encode, "rabibridge.core has no json_encode: is host/json.c in the Makefile's CORE_SRC?")

local encode, decode = core.json_encode, core.json_decode
local null, array_mt = core.null, core.array_mt

local function array(t) return setmetatable(t or {}, array_mt) end
local F = require "codec_fastpath"
local C = { encode = encode, decode = decode, array = array, null = null }

-- Asserts that decoding fails, without raising, and returns the message.
local function decode_error(text)
  local v, err = decode(text)
  assert.is_nil(v, ("%q decoded"):format(text))
  assert.is_string(err)
  return err
end

local function encode_error(value)
  local s, err = encode(value)
  assert.is_nil(s)
  assert.is_string(err)
  return err
end

describe("json", function()
  it("round-trips nested structures", function()
    local value = {
      name = "rabi", count = 3, ratio = 0.25, ok = true, off = false,
      list = array { 1, "two", array { 3, array {} }, { four = 4 } },
      map = { deep = { deeper = { deepest = "yes" } } },
    }
    local text = assert(encode(value))
    local back = decode(text)
    assert.are.same(value, back)
    assert.are.equal(array_mt, getmetatable(back.list[3][2]))
    -- single-key objects leave no room for key order to differ
    local canonical = '[{"a":[1,2,{"b":null}]},[],{},"x",-1.5,true,false,null]'
    assert.are.equal(canonical, encode(decode(canonical)))
  end)

  it("keeps [] and {} apart through decode and encode", function()
    assert.are.equal("[[],{}]", encode(decode("[[],{}]")))
    local value = decode('{"a":[],"b":{}}')
    assert.are.equal(array_mt, getmetatable(value.a))
    assert.is_nil(getmetatable(value.b))
    assert.are.equal("[]", encode(value.a))
    assert.are.equal("{}", encode(value.b))
    assert.are.equal('[{"x":[[]]}]', encode(decode('[{"x":[[]]}]')))
  end)

  it("encodes tables marked with array_mt as arrays and empty plain tables as objects", function()
    assert.are.equal("[]", encode(array()))
    assert.are.equal("{}", encode({}))
    assert.are.equal("[1,2,3]", encode(array { 1, 2, 3 }))
    assert.are.equal("[1,2,3]", encode({ 1, 2, 3 }))
    assert.are.equal(array_mt, debug.getregistry()["rabibridge.array_mt"])
    -- the request shape of the wire protocol, empty args and kwargs
    assert.are.equal("[[],{}]", encode(array { array(), {} }))
  end)

  it("writes holes in sparse arrays as null, and too sparse tables as objects", function()
    assert.are.equal("[1,null,3]", encode({ 1, nil, 3 }))
    assert.are.equal("[null,2]", encode({ [2] = 2 }))
    local sparse = decode(encode({ [1] = "a", [10] = "b" }))
    assert.are.same({ ["1"] = "a", ["10"] = "b" }, sparse)
    assert.are.equal('{"1.5":true}', encode({ [1.5] = true }))
    assert.are.same({ ["1"] = 1, x = 2 }, decode(encode({ 1, x = 2 })))
  end)

  it("has a null that is cjson's and survives a round trip", function()
    assert.are.equal("userdata", type(null))
    assert.are.equal(require("cjson").null, null)
    assert.are.equal("null", encode(nil))
    assert.are.equal("null", encode(null))
    assert.are.equal(null, decode("null"))
    local t = decode("[1,null,3]")
    assert.are.equal(3, #t)
    assert.are.equal(null, t[2])
    assert.are.equal('{"a":null}', encode(decode('{"a":null}')))
  end)

  it("decodes unicode escapes and surrogate pairs to UTF-8", function()
    assert.are.equal("é", decode('"\\u00e9"'))
    assert.are.equal("€", decode('"\\u20AC"'))
    assert.are.equal("😀", decode('"\\ud83d\\ude00"'))
    assert.are.equal("a\0b", decode('"a\\u0000b"'))
    assert.are.equal("żółw 🐢", decode('"żółw 🐢"'))
    -- UTF-8 goes out as it is, not as \u escapes
    assert.are.equal('"żółw 🐢"', encode("żółw 🐢"))
  end)

  it("refuses to write a string that is not UTF-8, naming the byte and where it sits", function()
    -- JSON carries text: a Python peer drops a body that is not UTF-8.
    assert.matches("cannot serialise a string that is not UTF%-8 as JSON %(byte 1 is 0x80%)",
      encode_error("\128abc"))
    for _, bad in ipairs { "\255", "\192\128", "\224\128\128", "\240\128\128\128", "\244\144\128\128",
                           "\248\136\128\128\128", "a\195", "\195(" } do
      encode_error(bad)
    end
    assert.matches("at args%[2%]%.name$", select(2, encode({ 1, { name = "a\255" } }, "args")))
    assert.matches("at result$", select(2, encode("\255", "result")))
    assert.matches("a table key that is not UTF%-8", encode_error({ ["k\255"] = 1 }))
    -- the path itself stays printable text
    assert.matches('at %["k\\x01"%]$', encode_error({ ["k\1"] = print }))
    -- reading is lenient: such bytes in the input pass through
    assert.are.equal("\128\255", decode('"\128\255"'))
  end)

  it("checks UTF-8 strictly: no overlong forms, surrogates or code points above U+10FFFF", function()
    assert.is_true(core.utf8_check("żółw 🐢 \244\143\191\191"))
    assert.are.same({ false, 1 }, { core.utf8_check("\192\128") })
    assert.are.same({ false, 2 }, { core.utf8_check("a\237\160\128") })
    assert.are.same({ false, 1 }, { core.utf8_check("\244\144\128\128") })
    assert.are.same({ false, 3 }, { core.utf8_check("ab\226\130") })
  end)

  it("decodes a lone surrogate escape to its three bytes and writes it back as the same escape", function()
    -- Python writes json.dumps("\ud800") as "\ud800"; WTF-8 keeps it.
    assert.are.equal("\237\160\128", decode('"\\ud800"'))
    assert.are.equal("\237\176\128\237\160\128x", decode('"\\udc00\\ud800x"'))
    assert.are.equal("\237\160\128A", decode('"\\ud800\\u0041"'))
    assert.are.equal('"\\ud800"', encode(decode('"\\ud800"')))
    assert.are.equal('"a\\udfffb"', encode("a\237\191\191b"))
    -- a pair is one character beyond the BMP
    assert.are.equal("😀", decode('"\\ud83d\\ude00"'))
  end)

  it("escapes quotes, backslashes and control characters", function()
    assert.are.equal([["q\"b\\s\n\r\t\b\f\u0001\u001f\u0000/"]], encode('q"b\\s\n\r\t\b\f\1\31\0/'))
    assert.are.equal('q"b\\s/\n\r\t\b\f', decode([["q\"b\\s\/\n\r\t\b\f"]]))
    local all = {}
    for c = 0, 127 do all[#all + 1] = string.char(c) end
    all = table.concat(all)
    assert.are.equal(all, decode(encode(all)))
  end)

  it("writes integers without a decimal point and floats exactly", function()
    assert.are.equal("3", encode(3))
    assert.are.equal("-7", encode(-7))
    assert.are.equal("0", encode(0))
    assert.are.equal("1.5", encode(1.5))
    assert.are.equal("0.1", encode(0.1))
    for _, x in ipairs { 1 / 3, 0.1 + 0.2, -2.5e-8, 123.456, 5e-324, math.pi } do
      assert.are.equal(x, decode(encode(x)))
      assert.is_nil(encode(x):find("^%d+$"))
    end
    assert.are.equal(3, decode("3"))
    assert.are.equal(100, decode("1e2"))
    assert.are.equal(-1.25, decode("-12.5E-1"))
  end)

  it("handles large and negative numbers", function()
    assert.are.equal("9007199254740991", encode(2 ^ 53 - 1))
    assert.are.equal("-9007199254740991", encode(-(2 ^ 53 - 1)))
    assert.are.equal("1e+300", encode(1e300))
    for _, x in ipairs { 2 ^ 53, 2 ^ 64, -1e300, 1.7976931348623157e308 } do
      local text = encode(x)
      assert.are.equal(x, decode(text))
      assert.are.equal(x, require("cjson").decode(text)) -- valid JSON for others too
    end
    assert.are.equal(-0.5, decode("-0.5"))
  end)

  it("writes integral numbers up to 2^63 as integers, never in exponent form", function()
    -- Python must receive an int: 2^60 from Lua is not a float there.
    assert.are.equal("1152921504606846976", encode(2 ^ 60))
    assert.are.equal("-9223372036854775808", encode(-2 ^ 63))
    assert.are.equal("9223372036854775808", encode(2 ^ 63))
    assert.are.equal("-123456789012345680", encode(-123456789012345678))
    -- beyond 2^63 a double is a float to Python as well
    assert.are.equal("1.8446744073709552e+19", encode(2 ^ 64))
    assert.are.equal("1e+20", encode(1e20))
  end)

  it("decodes integers a double cannot hold to 64-bit cdata, and writes them back unchanged", function()
    local cases = {
      { "9007199254740993", 9007199254740993LL }, { "9223372036854775807", 9223372036854775807LL },
      { "-9223372036854775808", -9223372036854775807LL - 1 }, { "18446744073709551615", 18446744073709551615ULL },
      { "-9007199254740993", -9007199254740993LL },
    }
    for _, c in ipairs(cases) do
      local v = decode(c[1])
      assert.are.equal("cdata", type(v))
      assert.is_true(v == c[2], c[1])
      assert.are.equal(tostring(c[2]), tostring(v)) -- int64_t or uint64_t, as the literal
      assert.are.equal(c[1], encode(v))
      assert.are.equal("[" .. c[1] .. "]", encode(decode("[" .. c[1] .. "]")))
    end
    -- up to 2^53 an integer is a plain number
    assert.are.equal("number", type(decode("9007199254740992")))
    assert.are.equal("number", type(decode("-9007199254740992")))
    -- beyond 64 bits, a double as near as one gets
    assert.are.equal(2 ^ 64, decode("18446744073709551616"))
    assert.are.equal(-2 ^ 64, decode("-18446744073709551616"))
    -- 64-bit cdata made in Lua go out as integers
    assert.are.equal("[5,-5,12345678901234567890]", encode(array { 5LL, -5LL, 12345678901234567890ULL }))
    assert.matches("type cdata", encode_error(require("ffi").new("double", 1)))
  end)

  it("keeps -0.0 a float, and reads -0 as the integer 0, as Python does", function()
    assert.are.equal("-0.0", encode(-0.0))
    assert.are.equal("0", encode(0.0))
    assert.are.equal(-math.huge, 1 / decode("-0.0"))
    assert.are.equal(math.huge, 1 / decode("-0"))
  end)

  it("reads and writes NaN, Infinity and -Infinity as Python's json does", function()
    assert.are.equal("NaN", encode(0 / 0))
    assert.are.equal("Infinity", encode(math.huge))
    assert.are.equal("[1,-Infinity]", encode(array { 1, -math.huge }))
    local v = decode("[NaN,Infinity,-Infinity]")
    assert.is_true(v[1] ~= v[1])
    assert.are.equal(math.huge, v[2])
    assert.are.equal(-math.huge, v[3])
    for _, bad in ipairs { "nan", "inf", "-NaN", "Inf", "-Inf", "+Infinity", "NaNa" } do decode_error(bad) end
  end)

  it("refuses values that have no JSON form, saying which and where", function()
    assert.matches("cannot serialise a value of type function", encode_error(print))
    assert.matches("type thread", encode_error({ co = coroutine.create(print) }))
    assert.matches("type userdata", encode_error({ io.stdout }))
    assert.matches("type function at %[2%]%.name", encode_error({ 1, { name = print } }))
  end)

  it("refuses table keys other than strings and numbers", function()
    assert.matches("cannot serialise a table key of type boolean", encode_error({ [true] = 1 }))
    assert.matches("table key of type table", encode_error({ a = 1, [{}] = 2 }))
    assert.are.equal('{"inf":1}', encode({ [math.huge] = 1 }))
  end)

  it("stops at nesting deeper than 1000, such as a cycle", function()
    local t = {}
    t.self = t
    assert.matches("nesting deeper than 1000 %(a cycle%?%)", encode_error(t))
    local deep = array()
    for _ = 2, 1000 do deep = array { deep } end
    assert.are.equal(string.rep("[", 1000) .. string.rep("]", 1000), encode(deep))
    assert.matches("nesting deeper than 1000", encode_error(array { deep }))
  end)

  it("decodes up to 1000 levels of nesting and refuses more", function()
    local ok = string.rep("[", 1000) .. string.rep("]", 1000)
    assert.are.equal(ok, encode(decode(ok)))
    assert.matches("nesting deeper than 1000 at byte 1001",
      decode_error(string.rep("[", 1001) .. string.rep("]", 1001)))
    assert.matches("nesting deeper than 1000", decode_error(string.rep('{"a":', 1001) .. "1" .. string.rep("}", 1001)))
    -- far deeper than the limit: still a message, not a crash
    assert.matches("nesting deeper", decode_error(string.rep("[", 100000)))
  end)

  it("reports syntax errors with what was expected and the byte", function()
    assert.are.equal("expected ',' or ']' at byte 6", decode_error("[1,2 3]"))
    assert.are.equal("expected ',' or '}' at byte 8", decode_error('{"a":1 "b":2}'))
    assert.are.equal("expected ':' at byte 6", decode_error('{"a" 1}'))
    assert.are.equal("expected a string key at byte 2", decode_error("{a:1}"))
    assert.are.equal("unexpected character ']' at byte 4", decode_error("[1,]"))
    assert.are.equal("unexpected character ''' at byte 1", decode_error("'a'"))
    assert.matches("unexpected end of input %(expected ',' or ']'%) at byte 5", decode_error("[1,2"))
    assert.matches("unexpected end of input", decode_error('{"a":'))
  end)

  it("follows the JSON number grammar strictly", function()
    for _, bad in ipairs { "01", "-01", "1.", "-", "1e", "1e+", "1.e5", "--1", "-a", "[1.]" } do
      assert.matches("invalid number", decode_error(bad))
    end
    for _, bad in ipairs { ".5", "+1" } do
      assert.matches("unexpected character", decode_error(bad))
    end
    for _, bad in ipairs { "0x10", "1_000", "1.5.2" } do
      assert.matches("unexpected data after the value", decode_error(bad))
    end
    assert.matches("leading zero", decode_error("012"))
    assert.matches("at byte 2", decode_error("0x10"))
    assert.are.equal(0, decode("0"))
    assert.are.equal(0, decode("-0"))
    assert.are.equal(1e-5, decode("1E-5"))
  end)

  it("refuses bad strings: escapes, lone surrogates, raw control characters", function()
    assert.matches("invalid escape '\\x' at byte 3", decode_error('["\\x"]'))
    assert.matches("invalid \\u escape", decode_error('"\\u12G4"'))
    assert.matches("invalid \\u escape", decode_error('"\\u12"'))
    assert.matches("unescaped control character 0x0a in string at byte 3", decode_error('"a\nb"'))
    assert.matches("unescaped control character 0x00", decode_error('"a\0b"'))
    assert.matches("unterminated string at byte 2", decode_error('["abc'))
    assert.matches("unterminated string", decode_error('"abc\\'))
  end)

  it("allows surrounding whitespace but nothing else around the value", function()
    assert.are.same({ 1 }, decode(" \t\r\n[1] \n"))
    assert.are.equal("x", decode('  "x"'))
    assert.matches("unexpected data after the value at byte 4", decode_error("[1]x"))
    assert.matches("unexpected data after the value", decode_error("1 2"))
    assert.matches("unexpected data after the value at byte 4", decode_error("[1]\0"))
    assert.matches("unexpected byte 0x00 at byte 2", decode_error("[\0]"))
    assert.matches("empty input", decode_error(""))
    assert.matches("empty input", decode_error(" \n "))
    assert.matches("invalid literal", decode_error("tru"))
    assert.matches("invalid literal", decode_error("nul"))
    assert.matches("unexpected character 'T'", decode_error("True"))
  end)

  it("lets the last of repeated keys win", function()
    assert.are.same({ a = 2, b = 1 }, decode('{"a":1,"b":1,"a":2}'))
  end)

  it("never raises for bad values or bad input", function()
    local inputs = { "", "[", "]", "{", '{"a"', "\255\254", "[1,2,", '"\\ud83d', "nan", "[1e999999]", ("["):rep(5000) }
    for _, text in ipairs(inputs) do
      local ok, v, err = pcall(decode, text)
      assert.is_true(ok)
      assert.is_true(v ~= nil or type(err) == "string")
    end
    local not_strings = { n = 3, nil, {}, print }
    for i = 1, not_strings.n do
      local ok, v, err = pcall(decode, not_strings[i])
      assert.is_true(ok)
      assert.is_nil(v)
      assert.matches("expects a string", err)
    end
    for _, value in ipairs { print, { [print] = 1 }, { "\255" }, coroutine.create(print) } do
      local ok, s, err = pcall(encode, value)
      assert.is_true(ok)
      assert.is_nil(s)
      assert.is_string(err)
    end
  end)

  -- The dispatcher's fast path for a function without params: what it
  -- takes must give the handler what decode_request and bind give it, and
  -- everything else must be left to them (false).
  it("json_call_args decodes plain requests as decode_request and bind do, and leaves the rest", function()
    local serial = require "rabibridge.serial"
    local service = require "rabibridge.service"
    local codec = serial.get("json")
    local spec = { name = "f" }
    local function packed(...) return { n = select("#", ...), ... } end
    local plain = {
      "[[],{}]", ' [ [ ] , { } ] ', '[[1],{}]', '[["x"],{}]', '[[null],{}]', '[[null, null, 3], {}]', '[[ null ,1],{ }]', '[[1,null],{}]', '[[null,2,null],{}]',
      '[[{"a":[null,{}]},[],{}],{}]', '[["a\\"b\\u00e9",1.5,-0,true,false,12345678901234567890],{}]',
      '[[[null]],{}]', "[[1]\n,\t{}\r]\n",
    }
    for _, body in ipairs(plain) do
      local got = packed(core.json_call_args(body))
      assert.is_true(got[1], body)
      local args, kwargs = codec.decode_request(body)
      local argv, n = service.bind(spec, args, kwargs)
      assert.are.equal(n, got.n - 1, body)
      for i = 1, n do assert.are.same(argv[i], got[i + 1], body) end
    end
    local others = {
      "", "[", "[[],{}", "[[],{}]x", "[[],{},1]", "[{},{}]", "[null,{}]", "[[],[]]", "[[],null]", '[[],{"a":1}]',
      "[[1,],{}]", "[[1 2],{}]", '[["\\q"],{}]', "[[nul],{}]", "{}", "[]", "[[]]", "\0", "[[],{}]\0",
      "[[" .. ("["):rep(1100) .. ("]"):rep(1100) .. "],{}]",
      "[[" .. ("1,"):rep(9000) .. "1],{}]",
    }
    for _, body in ipairs(others) do
      local got = packed(core.json_call_args(body))
      assert.are.same({ n = 1, false }, got, body)
    end
    assert.are.same({ n = 1, false }, packed(core.json_call_args(nil)))
    assert.are.same({ n = 1, false }, packed(core.json_call_args(12)))
  end)

  it("json_result writes [0, result] as encode_result would from one value, several or none", function()
    local cases, fails = F.result_cases(C)
    -- text that is not UTF-8 is refused by both
    fails[#fails + 1] = { n = 3, 1, 2, "\255" }
    fails[#fails + 1] = { n = 1, { "\255" } }
    F.assert_same(F.old_result(C, function(body) return "[0," .. body .. "]" end), core.json_result, cases, fails)
  end)

  it("json_request writes [args, kwargs] as encoding each and joining them would", function()
    local cases, fails = F.request_cases(C)
    F.assert_same(F.old_request(C, function(a, k) return "[" .. a .. "," .. k .. "]" end), core.json_request, cases, fails)
  end)

  it("decode_reply reads plain replies through json_reply as through json_decode", function()
    local serial = require "rabibridge.serial"
    F.assert_replies(C, serial.get("json").decode_reply, {
      "[0,1]", "[1,\"boom\"]", ' [ 0 , {"a":[1,null]} ] ', "[0,null]", "[1,null]", "[0,[]]", "[0,{}]", "[0,\"\\u00e9\"]",
      "[0]", "[2,1]", "[0,1,2]", "[0.0,1]", "[1e0,\"x\"]", "[01,1]", "{}", "null", "", "[0,", "[0,1]x", "[0,nul]",
      "[true,1]", "[\"0\",1]", "[0 1]", "[0,1]\0", "[0," .. ("["):rep(1100) .. ("]"):rep(1100) .. "]",
    })
  end)
end)

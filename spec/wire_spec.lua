-- Values on the wire: arrays and objects, null, unicode, numbers, big
-- payloads, results JSON cannot carry; and the exact request body a
-- foreign (Python) server receives. README: Values on the wire.
local H = require "helper"

local function hex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

-- Whitespace-free JSON text, so Python's "[[], {}]" and "[[],{}]" compare.
local function compact(s) return (s:gsub("%s+", "")) end

describe("values", function()
  local host, client, rabi
  local function N(base) return host:name(base) end
  local function echo(...) return client:remote_call(N("echo"), { ... }) end
  local fx = H.host_fixture { dir = "spec/fixtures/basic" }

  setup(function()
    rabi = H.rabi()
    host, client = fx:start()
  end)

  teardown(function() fx:stop() end)

  describe("arrays and objects", function()
    it("an empty array and an empty object keep their kinds through rabihost call", function()
      local res = H.cli { "call", N("echo"), "[]", "{}" }
      assert.equal(0, res.code, res.stderr)
      assert.equal("[[],{}]", compact(res.stdout))
    end)

    it("an empty array built with rabi.array{} goes back as [], an empty object as {}", function()
      local res = H.cli { "call", N("empties") }
      assert.equal(0, res.code, res.stderr)
      assert.equal("[[],{}]", compact(res.stdout))
    end)

    it("a decoded empty array stays an array in Lua: it encodes back as []", function()
      local r = client:remote_call(N("echo"), { rabi.array {}, {} })
      assert.equal(2, #r)
      assert.equal("[[],{}]", compact(require("rabibridge.serial").encode(r)))
    end)

    it("nested arrays and objects round-trip", function()
      local v = {
        name = "outer",
        list = { 1, 2, { 3, { 4, { deep = { deeper = { "x", "y" } } } } } },
        map = { a = { b = { c = { d = "e" } } }, n = 0, f = false, t = true },
      }
      assert.same(v, echo(v))
    end)
  end)

  describe("null", function()
    it("JSON null arrives as rabi.null inside tables and top-level null as nil", function()
      local r = client:remote_call(N("nulls"), { rabi.null, { rabi.null, 2 }, { k = rabi.null } })
      assert.same({ a_is_nil = true, arr_first_is_null = true, obj_k_is_null = true }, r)
    end)

    it("rabi.null inside a table comes back as rabi.null", function()
      local r = echo({ 1, rabi.null, 3 })
      assert.equal(3, #r)
      assert.equal(rabi.null, r[2])
      assert.equal(3, r[3])
    end)

    it("a nil between results comes back as rabi.null in the array", function()
      local r = client.fn[N("echo")](1, nil, 3)
      assert.equal(3, r[3])
      assert.equal(rabi.null, r[2])
      assert.equal(1, r[1])
    end)

    it("trailing nil arguments from client.fn travel as null and arrive as nil", function()
      assert.equal("x|nil|nil", client.fn[N("bound")]("x", nil, nil))
    end)
  end)

  describe("strings and numbers", function()
    it("unicode strings round-trip (accents, CJK, emoji, in keys too)", function()
      local v = { s = "héllo wörld ✓ 日本語 🎉🚀 𝄞", ["ключ"] = "значение", list = { "ü", "€", "👍🏽" } }
      assert.same(v, echo(v))
      assert.equal("🎉", echo("🎉"))
    end)

    it("strings with quotes, backslashes, control characters and NUL round-trip", function()
      local s = 'quote " backslash \\ slash / tab \t newline \n cr \r nul \0 bell \7 end'
      assert.equal(s, echo(s))
    end)

    it("integers and floats keep their values", function()
      local values = { 0, 1, -1, 3, -7, 42, 2 ^ 31, 2 ^ 32 + 1, 2 ^ 53, -(2 ^ 53), 123456789012,
        0.5, -0.25, 3.5, 0.1, 0.1 + 0.2, 1 / 3, 1e-300, 1.7976931348623157e308, 5e-324 }
      local r = client:remote_call(N("echo"), values)
      assert.equal(#values, #r)
      for i, v in ipairs(values) do
        assert.equal(v, r[i], ("value %d: sent %.17g, got %.17g"):format(i, v, r[i] or 0 / 0))
      end
    end)

    it("an integer prints as an integer and a float as a float in rabihost call", function()
      local res = H.cli { "call", N("echo"), "3", "3.5", "-0.25", "9007199254740992" }
      assert.equal(0, res.code, res.stderr)
      assert.equal("[3,3.5,-0.25,9007199254740992]", compact(res.stdout))
    end)
  end)

  describe("big payloads", function()
    local function payload(n)
      -- Not a single repeated byte, so compression has some work to do.
      local parts, x = {}, 12345
      for i = 1, n / 64 do
        x = (x * 1103515245 + 12345) % 2147483648
        parts[i] = ("%08x"):format(x):rep(8)
      end
      return table.concat(parts)
    end

    it("a 1 MiB string round-trips", function()
      local s = payload(1024 * 1024)
      assert.equal(1024 * 1024, #s)
      local r = echo(s)
      assert.equal(#s, #r)
      assert.is_true(r == s, "the payload came back changed")
    end)

    it("a 1 MiB string arrives whole at the handler", function()
      local s = payload(1024 * 1024)
      local sum = 0
      for i = 1, #s, 97 do sum = (sum + s:byte(i)) % 1000003 end
      assert.same({ len = #s, sum = sum }, client:remote_call(N("measure"), { s }))
    end)

    it("a table of 20000 entries round-trips", function()
      local t = {}
      for i = 1, 20000 do t[i] = { id = i, name = "item " .. i } end
      local r = echo(t)
      assert.equal(20000, #r)
      assert.same(t[1], r[1])
      assert.same(t[20000], r[20000])
    end)
  end)

  describe("nesting", function()
    local function depth_of(v)
      local d = 0
      while type(v) == "table" do d, v = d + 1, v[1] end
      return d, v
    end

    it("a value nested 200 levels deep round-trips", function()
      local t = { "bottom" }
      for _ = 2, 200 do t = { t } end
      local d, bottom = depth_of(echo(t))
      assert.equal(200, d)
      assert.equal("bottom", bottom)
    end)

    it("a result nested 200 levels deep arrives", function()
      local d, bottom = depth_of(client:remote_call(N("nest"), { 200 }))
      assert.equal(200, d)
      assert.equal("bottom", bottom)
    end)

    it("a result nested 100000 levels deep is a remote error, and the worker serves on", function()
      H.expect_error("remote", client.remote_call, client, N("nest"), { 100000 })
      assert.equal("still here", echo("still here"))
    end)
  end)

  describe("results JSON cannot carry", function()
    it("a function returned is a remote error, and the worker serves on", function()
      local e = H.expect_error("remote", client.remote_call, client, N("ret_function"), {})
      assert.matches("serialise", e.message)
      assert.equal("still here", echo("still here"))
    end)

    it("a cyclic table returned is a remote error, and the worker serves on", function()
      H.expect_error("remote", client.remote_call, client, N("ret_cycle"), {})
      assert.equal("still here", echo("still here"))
    end)
  end)
end)

describe("the msgpack serialiser", function()
  local host, client, rabi
  local function echo(...) return client:remote_call(host:name("echo"), { ... }) end
  local fx = H.host_fixture { dir = "spec/fixtures/basic", args = { "--serialiser", "msgpack" },
                              client = { serialiser = "msgpack" } }

  setup(function()
    rabi = H.rabi()
    host, client = fx:start()
  end)

  teardown(function() fx:stop() end)

  it("calls with args and kwargs", function()
    assert.equal(5, client:remote_call(host:name("add"), { 2, 3 }))
    assert.equal("1|nil|3", client:remote_call(host:name("bound"), { 1 }, { c = 3 }))
  end)

  it("round-trips nested values, unicode and null", function()
    local v = { s = "héllo 🎉", list = { 1, 2.5, { deep = true } }, n = rabi.null, neg = -42 }
    local r = echo(v)
    assert.equal("héllo 🎉", r.s)
    assert.same({ 1, 2.5, { deep = true } }, r.list)
    assert.equal(rabi.null, r.n)
    assert.equal(-42, r.neg)
  end)

  it("keeps empty arrays and empty maps apart", function()
    local r = echo(rabi.array {}, {})
    local array_mt = getmetatable(rabi.array {})
    assert.equal(2, #r)
    assert.equal(array_mt, getmetatable(r[1]), "the empty array came back as a map")
    assert.not_equal(array_mt, getmetatable(r[2]), "the empty map came back as an array")
    assert.is_nil(next(r[1]))
    assert.is_nil(next(r[2]))
  end)

  it("keeps integers and floats", function()
    local values = { 0, -1, 2 ^ 31, 2 ^ 53, -(2 ^ 53), 0.1 + 0.2, 1 / 3, 1e-300 }
    local r = client:remote_call(host:name("echo"), values)
    for i, v in ipairs(values) do
      assert.equal(v, r[i], ("value %d: sent %.17g, got %.17g"):format(i, v, r[i] or 0 / 0))
    end
  end)

  it("round-trips a value nested 100 levels deep", function()
    local t = { "bottom" }
    for _ = 2, 100 do t = { t } end
    local ok, r = pcall(echo, t)
    assert.is_true(ok, tostring(r))
    local d = 0
    while type(r) == "table" do d, r = d + 1, r[1] end
    assert.equal(100, d)
    assert.equal("bottom", r)
  end)

  it("a result nested 100 levels deep arrives", function()
    local ok, r = pcall(client.remote_call, client, host:name("nest"), { 100 })
    assert.is_true(ok, tostring(r))
    local d = 0
    while type(r) == "table" do d, r = d + 1, r[1] end
    assert.equal(100, d)
  end)

  it("round-trips a binary string that is not UTF-8", function()
    local bin = "\0\1\2\255\254 bytes \192\128"
    assert.equal(bin, echo(bin))
  end)

  it("round-trips a 1 MiB string", function()
    local s = ("0123456789abcdef"):rep(65536)
    assert.equal(s, echo(s))
  end)

  it("a remote error comes back readable", function()
    local e = H.expect_error("remote", client.remote_call, client, host:name("fail"), { "msgpack" })
    assert.matches("kaboom: msgpack failed on purpose", e.message, 1, true)
  end)
end)

describe("the wire, seen by a foreign server", function()
  local client, rabi
  setup(function()
    rabi = H.rabi()
    client = H.client { serialiser = "json" } -- these bodies are JSON text
  end)
  teardown(function()
    if client then client:close() end
  end)

  local function serve_once(reply)
    local name = "raw" .. H.new_suffix()
    local srv = H.raw_serve_once("rpc_async_" .. name, "async_" .. name, reply)
    return name, srv
  end

  it("a request with no arguments is [[],{}] with a decimal correlation_id and a reply_to", function()
    local name, srv = serve_once('[0, {"got": "it"}]')
    local ok, r = pcall(client.remote_call, client, name, {})
    local req, err = srv:result()
    srv:stop()
    assert.is_true(ok, tostring(r))
    assert.same({ got = "it" }, r)
    assert.is_table(req, err)
    assert.equal("[[],{}]", compact(req.body))
    assert.matches("^%d+$", req.correlation_id)
    assert.is_string(req.reply_to)
    assert.is_true(#req.reply_to > 0)
    assert.equal("rpc", req.exchange)
    assert.equal("async_" .. name, req.routing_key)
  end)

  it("args travel as an array and kwargs as an object", function()
    local name, srv = serve_once('[0, null]')
    local ok, r = pcall(client.remote_call, client, name, { 1, "a" }, { k = true })
    local req = srv:result()
    srv:stop()
    assert.is_true(ok, tostring(r))
    assert.is_nil(r)
    assert.is_table(req)
    assert.equal('[[1,"a"],{"k":true}]', compact(req.body))
  end)

  it("a request over 1024 bytes is zstd-compressed on the wire", function()
    local name, srv = serve_once('[0, "ok"]')
    local big = ("compress me "):rep(1000)
    local ok, r = pcall(client.remote_call, client, name, { big })
    local req = srv:result()
    srv:stop()
    assert.is_true(ok, tostring(r))
    assert.equal("ok", r)
    assert.is_table(req)
    assert.equal("28b52ffd", req.body_hex:sub(1, 8))
    assert.is_true(#req.body < #big, "the compressed body is not smaller")
  end)

  it("a zstd-compressed reply is decompressed", function()
    local text = ("x"):rep(3000)
    local plain = H.tmpname("reply") .. ".json"
    H.write_file(plain, '[0, "' .. text .. '"]')
    local z = H.run { "zstd", "-q", "-c", plain }
    assert.equal(0, z.code, z.stderr)
    assert.equal("28b52ffd", hex(z.stdout:sub(1, 4)))
    local name, srv = serve_once(z.stdout)
    local ok, r = pcall(client.remote_call, client, name, {})
    srv:stop()
    assert.is_true(ok, tostring(r))
    assert.equal(text, r)
  end)

  it("a malformed reply is a client-side failure, not a hang or a crash", function()
    local name, srv = serve_once("this is not json")
    local t0 = H.now()
    local success, code, err = client:try_remote_call(name, {}, nil, nil, { timeout = 5 })
    srv:stop()
    assert.is_false(success)
    assert.equal(1, code)
    assert.is_table(err)
    assert.is_string(err.kind)
    assert.not_equal("timeout", err.kind)
    assert.is_true(H.now() - t0 < 4)
  end)
end)

-- Wire compatibility with the Python RabiBridge as it is deployed: a peer
-- that behaves as RabiBridge's client and server at their defaults
-- (spec/tools/py_peer.py: aio-pika, msgpack, zstandard) calls Lua services
-- and serves functions the Lua client calls, with msgpack and json, each
-- side left at its defaults, bodies small and zstd-compressed. The value
-- matrix is spec/interop_helper.lua.
local H = require "helper"
local I = require "interop_helper"
local cjson = require "cjson"

local PEER = "spec/tools/py_peer.py"
local SERIALISERS = { "msgpack", "json" }

local function py_call(serialiser, name, args, kwargs, timeout)
  local res = H.run { H.python, PEER, "call", H.url, serialiser, name, args, kwargs or "{}",
                      tostring(timeout or 10) }
  assert(res.code == 0, "py_peer call failed: " .. res.stderr)
  return cjson.decode(res.stdout)
end

-- calls: { { name =, args = "python literal", kwargs =, timeout = } }
local function py_batch(serialiser, calls)
  local res = H.run({ H.python, PEER, "batch", H.url, serialiser }, { stdin = cjson.encode(calls) })
  assert(res.code == 0, "py_peer batch failed: " .. res.stderr)
  return cjson.decode(res.stdout)
end

local function start_py_server(serialiser, suffix)
  local ready = H.tmpname("pyready")
  local pidfile = H.tmpname("pypid")
  os.execute(("( %s %s serve %s %s %s %s >%s.log 2>&1 </dev/null & echo $! >%s ) </dev/null")
    :format(H.python, PEER, H.quote(H.url), serialiser, suffix, H.quote(ready), H.quote(ready), H.quote(pidfile)))
  assert(H.wait_until(function() return H.exists(ready) end, 20), "python peer did not start")
  local pid = tonumber(H.read_file(pidfile):match("%d+"))
  return function() H.signal_if(pid, "py_peer.py", 15) end
end

-- Python's canon() of a str made of printable ASCII.
local function py_str(s) return "str('" .. s .. "')" end
local PAD = py_str(I.pad)

-- ---- the tally quoted in the report: cases per direction and serialiser ----

local tally, order = {}, {}
local function matrix_it(group, label, fn)
  if not tally[group] then
    tally[group] = { passed = 0, cases = 0 }
    order[#order + 1] = group
  end
  tally[group].cases = tally[group].cases + 1
  it(label, function()
    fn()
    tally[group].passed = tally[group].passed + 1
  end)
end

-- The value at the top of a result: result itself, or result[1] when the
-- call was padded, where a top-level null is nil as it would be unpadded.
local function unpad(result, padded)
  if not padded then return result end
  local v = result[1]
  if v == H.rabi().null then return nil end
  return v
end

describe("interop matrix", function()
  teardown(function()
    local lines = { "interop matrix (cases passed / cases):" }
    for _, g in ipairs(order) do
      lines[#lines + 1] = ("  %-46s %d / %d"):format(g, tally[g].passed, tally[g].cases)
    end
    io.stdout:write("\n", table.concat(lines, "\n"), "\n")
  end)

  -- ---- a Python client calls a rabihost service left at its defaults ----

  describe("Python client -> Lua service (no --serialiser: it takes both)", function()
    local host, S
    local results = {} -- serialiser -> list, in the order of `planned`
    local planned = { msgpack = {}, json = {} }

    local function plan(serialiser, call)
      local list = planned[serialiser]
      list[#list + 1] = call
      return #list
    end

    setup(function()
      host = H.start { dir = "spec/fixtures/interop" }
      S = host.suffix
      for _, serialiser in ipairs(SERIALISERS) do
        for _, call in ipairs(planned[serialiser]) do call.name = call.base .. S end
        results[serialiser] = py_batch(serialiser, planned[serialiser])
      end
    end)

    teardown(function() H.stop_all() end)

    for _, serialiser in ipairs(SERIALISERS) do
      local group = "Python client -> Lua service, " .. serialiser
      for _, padded in ipairs { false, true } do
        local variant = padded and " (compressed)" or ""
        local pad = padded and (", '" .. I.pad .. "'") or ""
        local function expect_padded(r, canon)
          if not padded then return canon end
          assert.is_true(r.reply_compressed, "the reply was not compressed")
          return "[" .. canon .. ", " .. PAD .. "]"
        end
        for _, c in ipairs(I.cases) do
          if I.py_sends(c, serialiser) then
            local echo = plan(serialiser, { base = "lua_value_echo", args = "[" .. c.py .. pad .. "]" })
            local described = plan(serialiser, { base = "lua_describe", args = "[" .. c.py .. pad .. "]" })
            matrix_it(group, serialiser .. ": Lua echoes " .. c.name .. variant, function()
              local r = results[serialiser][echo]
              assert.is_true(r.success, r.error)
              assert.equal(0, r.err_code, r.error)
              assert.equal(expect_padded(r, c.py_back or r.sent), r.canon)
            end)
            matrix_it(group, serialiser .. ": Lua receives " .. c.name .. variant, function()
              local r = results[serialiser][described]
              assert.is_true(r.success, r.error)
              assert.equal(0, r.err_code, r.error)
              assert.equal(I.field(c, "desc", serialiser), r.text)
              expect_padded(r, "")
            end)
          end
          if c.lua ~= nil then
            local made = plan(serialiser, { base = "lua_make", args = "['" .. c.name .. "'" .. pad .. "]" })
            matrix_it(group, serialiser .. ": Python receives " .. c.name .. variant, function()
              local r = results[serialiser][made]
              assert.is_true(r.success, r.error)
              if I.field(c, "error", serialiser) then
                -- the Lua service says why instead of sending what JSON cannot carry
                assert.equal(1, r.err_code)
                assert.matches("not UTF%-8 as JSON %(byte 1 is 0x%x%x%) at result", r.error)
                return
              end
              assert.equal(0, r.err_code, r.error)
              assert.equal(expect_padded(r, I.field(c, "canon", serialiser)), r.canon)
            end)
          end
        end
      end
    end
  end)

  -- ---- the Lua client calls a Python RabiBridge server ----

  for _, serialiser in ipairs(SERIALISERS) do
    local group = "Lua client -> Python service, " .. serialiser
    describe("Lua client -> Python service, " .. serialiser, function()
      local S, stop_py, client, stats_before
      local function N(base) return base .. S end

      setup(function()
        S = H.new_suffix()
        stop_py = start_py_server(serialiser, S)
        -- msgpack is the client's default: give no setting for it
        client = H.client(serialiser == "json" and { serialiser = "json" } or nil)
        stats_before = client:remote_call(N("py_stats"))
      end)

      teardown(function()
        if client then client:close() end
        if stop_py then stop_py() end
      end)

      for _, padded in ipairs { false, true } do
        local variant = padded and " (compressed)" or ""
        local function args(v)
          if padded then return H.rabi().array { v, I.pad } end
          return { v }
        end
        for _, c in ipairs(I.cases) do
          if c.lua ~= nil then
            matrix_it(group, serialiser .. ": Python receives " .. c.name .. variant, function()
              local success, code, result = client:try_remote_call(N("py_canon"), args(c.lua))
              local refused = I.field(c, "error", serialiser)
              if refused then
                assert.is_false(success)
                assert.equal("invalid_argument", result.kind)
                assert.matches(refused, result.message)
                return
              end
              assert.is_true(success, tostring(result))
              assert.equal(0, code, tostring(result))
              local canon = I.field(c, "canon", serialiser)
              if padded then
                assert.same({ canon, I.pad }, result)
              else
                assert.equal(canon, result)
              end
            end)
            if not I.field(c, "error", serialiser) then
              matrix_it(group, serialiser .. ": Python echoes " .. c.name .. variant, function()
                local result = client:remote_call(N("py_value_echo"), args(c.lua))
                assert.equal(c.lua_back or I.desc(c.lua), I.desc(unpad(result, padded)))
              end)
            end
          end
          if I.py_sends(c, serialiser) then
            matrix_it(group, serialiser .. ": Lua receives " .. c.name .. variant, function()
              local result = client:remote_call(N("py_make"), args(c.py))
              assert.equal(I.field(c, "desc", serialiser), I.desc(unpad(result, padded)))
            end)
          end
        end
      end

      matrix_it(group, serialiser .. ": every padded request reached Python compressed", function()
        local stats = client:remote_call(N("py_stats"))
        local padded_calls = 0
        for _, c in ipairs(I.cases) do
          if c.lua ~= nil and not I.field(c, "error", serialiser) then padded_calls = padded_calls + 2 end
          if I.py_sends(c, serialiser) then padded_calls = padded_calls + 1 end
        end
        assert.is_true(stats.compressed - stats_before.compressed >= padded_calls,
          ("%d compressed requests, expected %d"):format(stats.compressed - stats_before.compressed, padded_calls))
      end)
    end)
  end
end)

-- ---- calls, errors and defaults ----

for _, serialiser in ipairs(SERIALISERS) do
  describe("with " .. serialiser .. ", a Python RabiBridge", function()
    local host, S, stop_py, client
    local big = string.rep("é-ü-", 1000) -- 6000 bytes of UTF-8: compressed both ways

    setup(function()
      -- rabihost at its defaults: it answers each request in its serialiser
      host = H.start { dir = "spec/fixtures/interop" }
      S = host.suffix
      stop_py = start_py_server(serialiser, S)
      client = H.client(serialiser == "json" and { serialiser = "json" } or nil)
    end)

    teardown(function()
      if client then client:close() end
      if stop_py then stop_py() end
      H.stop_all()
    end)

    it("client calls a Lua service and gets its result", function()
      local r = py_call(serialiser, "lua_add" .. S, "[2, 3.5]")
      assert.same({ success = true, err_code = 0, result = 5.5 }, r)
    end)

    it("client binds kwargs to a Lua service's params", function()
      local r = py_call(serialiser, "lua_greet" .. S, "[]", '{"name": "Ada", "greeting": "Hi"}')
      assert.same("Hi, Ada", r.result)
    end)

    it("client gets a compressed large reply back intact", function()
      local r = py_call(serialiser, "lua_echo" .. S, cjson.encode { big, { 1, 2 } })
      assert.equal(0, r.err_code)
      assert.same({ big, { 1, 2 } }, r.result)
    end)

    it("client sees a Lua error as err_code 1 with the traceback", function()
      local r = py_call(serialiser, "lua_fail" .. S, "[]")
      assert.is_true(r.success)
      assert.equal(1, r.err_code)
      assert.matches("lua says no", r.result)
      assert.matches("stack traceback", r.result)
    end)

    it("client's args with nulls reach the handler as nils, every position kept", function()
      local r = py_batch(serialiser, { { name = "lua_args" .. S, args = "[None, None, 3]" } })[1]
      assert.equal("str('3: nil nil 3')", r.canon)
    end)

    it("client's arguments are converted by validate as pydantic's lax mode does", function()
      local r = py_batch(serialiser, {
        { name = "lua_typed" .. S, args = "['12', '1.5', 'yes']" },
        { name = "lua_typed" .. S, args = "[3.0, 2, 0, 'x']" },
        { name = "lua_typed" .. S, args = "['12345678901234567890', ' -1e3 ', 'off']" },
        { name = "lua_typed" .. S, args = "[1.5, 1, True]" },
        { name = "lua_typed" .. S, args = "['12a', 1, True]" },
        { name = "lua_typed" .. S, args = "[1, 1, 2]" },
        { name = "lua_typed" .. S, args = "[1, 1, True, 5]" },
      })
      assert.equal("str('12 1.5 true nil')", r[1].canon)
      assert.equal([[str('3 2 false s"x"')]], r[2].canon)
      assert.equal("str('12345678901234567890ULL -1000 false nil')", r[3].canon)
      assert.equal(1, r[4].err_code)
      assert.matches("argument 'i' must be integer, got 1.5 %(a number with a fraction%)", r[4].error)
      assert.matches([[argument 'i' must be integer, got string "12a"]], r[5].error)
      assert.matches("argument 'b' must be boolean, got integer", r[6].error)
      assert.matches("argument 's' must be string, got integer", r[7].error)
    end)

    it("server answers the Lua client", function()
      assert.equal(42, client:remote_call("py_add" .. S, { 40, 2 }))
    end)

    it("server ignores the W3C traceparent header the Lua client sends", function()
      local given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
      assert.equal(42, client:remote_call("py_add" .. S, { 40, 2 }, nil, nil, { traceparent = given }))
      local stats = client:remote_call("py_stats" .. S, {})
      -- the header came (the py_stats call's own), and made no difference
      assert.matches("^00%-" .. ("%x"):rep(32) .. "%-" .. ("%x"):rep(16) .. "%-01$", stats.traceparent)
    end)

    it("server gets args as a list and kwargs as a dict, empty ones included", function()
      local echoed = client:remote_call("py_echo" .. S, {}, {})
      assert.same({ {}, {} }, echoed)
      local rabi = H.rabi()
      -- Python's [] and {} come back as an array and an object, kept apart.
      assert.equal(getmetatable(rabi.array {}), getmetatable(echoed[1]))
      echoed = client:remote_call("py_echo" .. S, { 1, "two", big }, { k = "v" })
      assert.same({ { 1, "two", big }, { k = "v" } }, echoed)
    end)

    it("server gets args with holes as a list with None in them", function()
      assert.equal("[[None, None, int(3)], {}]", client:remote_call("py_canon_args" .. S, { nil, nil, 3 }))
      assert.equal("[[None, int(2)], {}]", client.fn["py_canon_args" .. S](nil, 2))
      assert.equal("[[None, int(2), None], {str('k'): int(1)}]",
        client:remote_call("py_canon_args" .. S, { nil, 2, H.rabi().null }, { k = 1 }))
    end)

    it("server's exception is a remote error whose message is the exception line", function()
      local err = H.catch(client.remote_call, client, "py_fail" .. S, {})
      assert.equal("remote", err.kind)
      assert.equal("ValueError: boom from python", err.message)
      assert.matches("^Traceback %(most recent call last%):\n", err.traceback)
      assert.matches("ValueError: boom from python\n$", err.traceback)
      -- a chained exception: the last one is the message
      err = H.catch(client.remote_call, client, "py_fail_chained" .. S, {})
      assert.equal("ValueError: boom after a KeyError", err.message)
      assert.matches("KeyError: 'missing'", err.traceback)
    end)

    it("server's exception is the line rabihost call prints, the traceback with --traceback", function()
      local res = H.cli { "call", "py_fail" .. S, "--serialiser", serialiser, "--url", H.url }
      assert.equal(1, res.code)
      assert.equal("error: remote: ValueError: boom from python\n", res.stderr)
      res = H.cli { "call", "py_fail" .. S, "--serialiser", serialiser, "--url", H.url, "--traceback" }
      assert.equal(1, res.code)
      assert.matches("^error: remote: ValueError: boom from python\nTraceback %(most recent call last%):\n",
        res.stderr)
    end)
  end)
end

describe("a rabihost server left at its defaults", function()
  local host, S
  local rabi = H.rabi()
  local core = require "rabibridge.core"

  setup(function()
    host = H.start { dir = "spec/fixtures/interop" }
    S = host.suffix
  end)

  teardown(function() H.stop_all() end)

  it("tells json (after whitespace) from msgpack and replies in kind", function()
    local out = H.raw_publish({
      { routing_key = "async_lua_value_echo" .. S, body = " \n\t[[1],{}]" },
      { routing_key = "async_lua_value_echo" .. S, body = core.msgpack_encode(rabi.array { rabi.array { 1 }, {} }) },
    }, 10)
    assert.equal("[0,1]", out[1].body)
    assert.equal("\146\0\1", out[2].body)
  end)

  it("answers a body that is neither in msgpack, saying what it looks like", function()
    local pickle = "\128\4\149\7\0\0\0\0\0\0\0)}\148\134\148." -- pickle.dumps(((), {}))
    local out = H.raw_publish({
      { routing_key = "async_lua_value_echo" .. S, body = pickle },
      { routing_key = "async_lua_value_echo" .. S, body = '{"args": []}' },
    }, 10)
    local r1 = assert(core.msgpack_decode(out[1].body))
    assert.equal(1, r1[1])
    assert.matches("starts with 0x80 0x04: pickle", r1[2])
    local r2 = assert(core.msgpack_decode(out[2].body))
    assert.matches("starts with '{': a JSON object; a request is %[args, kwargs%]", r2[2])
  end)

  it("warns that a timeout of no whole seconds keeps Python servers off its queue", function()
    assert.matches("register_call%('lua_fractional_ttl" .. S .. "'%): timeout 2.5 is not whole seconds",
      host:log())
  end)
end)

-- Wire compatibility with the Python RabiBridge (design.md section 4): a
-- Python peer (spec/tools/py_peer.py, aio-pika + msgpack + zstandard) calls
-- Lua services and serves functions the Lua client calls, with json and
-- with msgpack, bodies small and compressed.
local H = require "helper"
local cjson = require "cjson"

local PEER = "spec/tools/py_peer.py"

local function py_call(serialiser, name, args, kwargs, timeout)
  local res = H.run { H.python, PEER, "call", H.url, serialiser, name, args, kwargs or "{}",
                      tostring(timeout or 10) }
  assert(res.code == 0, "py_peer call failed: " .. res.stderr)
  return cjson.decode(res.stdout)
end

local function start_py_server(serialiser, suffix)
  local ready = H.tmpname("pyready")
  local pidfile = H.tmpname("pypid")
  os.execute(("( %s %s serve %s %s %s %s >%s.log 2>&1 </dev/null & echo $! >%s ) </dev/null")
    :format(H.python, PEER, H.quote(H.url), serialiser, suffix, H.quote(ready), H.quote(ready), H.quote(pidfile)))
  assert(H.wait_until(function() return H.exists(ready) end, 20), "python peer did not start")
  local f = io.open(pidfile)
  local pid = f:read("*n")
  f:close()
  -- Signal it only while that pid is still our peer: pids are reused.
  return function()
    local cmd = io.open("/proc/" .. pid .. "/cmdline")
    local line = cmd and cmd:read("*a") or ""
    if cmd then cmd:close() end
    if line:find("py_peer.py", 1, true) then os.execute("kill -TERM " .. pid .. " 2>/dev/null") end
  end
end

for _, serialiser in ipairs { "json", "msgpack" } do
  describe("with " .. serialiser .. ", a Python RabiBridge", function()
    local host, S, stop_py, client
    local big = string.rep("é-ü-", 1000) -- 6000 bytes of UTF-8: compressed both ways

    setup(function()
      host = H.start { dir = "spec/fixtures/interop", args = { "--serialiser", serialiser } }
      S = host.suffix
      stop_py = start_py_server(serialiser, S)
      client = H.client { serialiser = serialiser }
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

    it("server answers the Lua client", function()
      assert.equal(42, client:remote_call("py_add" .. S, { 40, 2 }))
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

    it("server's exception is a remote error carrying the Python traceback", function()
      local err = H.catch(client.remote_call, client, "py_fail" .. S, {})
      assert.equal("remote", err.kind)
      assert.matches("ValueError: boom from python", err.traceback)
      assert.matches("Traceback", err.traceback)
    end)
  end)
end

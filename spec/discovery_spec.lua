-- rabihost list and rabi.discover (issue 12, point 5): the functions served
-- on the broker, as the hosts serving them describe themselves, against
-- real hosts (two of them serving the same functions), a Python RabiBridge
-- server beside them, and the broker's own counts.
local H = require "helper"
local cjson = require "cjson"

local FIXTURE = "spec/fixtures/discovery"
local PEER = "spec/tools/py_peer.py"

-- rabihost list ARGS... -> the result of H.cli
local function list(args)
  local words = { "list" }
  for _, a in ipairs(args or {}) do words[#words + 1] = a end
  return H.cli(words)
end

-- rabihost list --json ARGS... -> functions by "ftype_name", the whole document
local function list_json(args)
  local words = { "--json" }
  for _, a in ipairs(args or {}) do words[#words + 1] = a end
  local res = list(words)
  assert(res.code == 0, ("rabihost list --json exited %s: %s"):format(tostring(res.code), res.stderr))
  local doc = cjson.decode(res.stdout)
  local by = {}
  for _, f in ipairs(doc.functions) do by[f.ftype .. "_" .. f.name] = f end
  return by, doc
end

-- The row of the human table that starts with name.
local function row(stdout, name)
  for line in stdout:gmatch("[^\n]+") do
    if line:sub(1, #name + 1) == name .. " " then return line end
  end
  return nil
end

local function start_py_server(suffix)
  local ready = H.tmpname("pyready")
  local pidfile = H.tmpname("pypid")
  os.execute(("( %s %s serve %s msgpack %s %s >%s.log 2>&1 </dev/null & echo $! >%s ) </dev/null")
    :format(H.python, PEER, H.quote(H.url), suffix, H.quote(ready), H.quote(ready), H.quote(pidfile)))
  assert(H.wait_until(function() return H.exists(ready) end, 20), "python peer did not start")
  local pid = tonumber(H.read_file(pidfile):match("%d+"))
  return function() H.signal_if(pid, "py_peer.py", 15) end
end

describe("rabihost list with no rabihost on the broker", function()
  it("says that none answered, at once rather than after the wait", function()
    local res = list { "--wait", "8" }
    assert.equal(0, res.code, res.stderr)
    assert.equal("", res.stdout)
    assert.matches("no rabihost answered", res.stderr)
    -- The broker returned the request: nobody is bound to the key.
    assert.is_true(res.elapsed < 6, ("took %.1f s: the unroutable request did not end the wait"):format(res.elapsed))
  end)

  it("exits 69 when the broker cannot be reached", function()
    local res = H.cli { "list", "--url", H.dead_url }
    assert.equal(69, res.code, res.stderr)
    assert.matches("rabihost:", res.stderr)
  end)

  it("refuses a bad --wait with 64", function()
    local res = list { "--wait", "soon" }
    assert.equal(64, res.code)
    assert.matches("%-%-wait", res.stderr)
  end)
end)

describe("rabihost list against running hosts", function()
  local S = H.new_suffix()
  local h1, h2
  local function N(base) return base .. S end

  setup(function()
    -- Two hosts on one set of queues: one with two workers, one with one.
    h1 = H.start { dir = FIXTURE, suffix = S, args = { "-w", "2", "--access-log" } }
    h2 = H.start { dir = FIXTURE, suffix = S }
    assert(H.wait_until(function() return h1:log_count("serving %d+ functions") == 2 end, 20),
      "the second worker of the first host did not start:\n" .. h1:log())
  end)
  teardown(function()
    h1:stop()
    h2:stop()
  end)

  it("merges the workers of both hosts into one row per function, with the broker's consumers", function()
    local by = list_json()
    local add = by["async_" .. N("add")]
    assert.is_table(add, "add is not listed")
    assert.equal(3, add.consumers)
    assert.equal(0, add.messages)
    assert.equal(3, #add.hosts)
    local supervisors = {}
    for _, h in ipairs(add.hosts) do supervisors[h.supervisor] = (supervisors[h.supervisor] or 0) + 1 end
    assert.equal(2, supervisors[h1:pid()])
    assert.equal(1, supervisors[h2:pid()])
    assert.is_true(add.known)
    assert.is_nil(add.differs)
  end)

  it("gives each function's params, ftype and queue arguments as registered", function()
    local by = list_json()
    local add = by["async_" .. N("add")]
    assert.same({ "a:number", "b:number" }, add.params)
    assert.is_true(add.validate)
    assert.equal(8, add.fetch_size)
    assert.equal("rpc_async_" .. N("add"), add.queue)
    assert.same({ ["x-overflow"] = "reject-publish", ["x-max-length"] = 100, ["x-message-ttl"] = 10000 },
      add.queue_arguments)
    assert.same({ "name:string", "greeting:string?", "extra" }, by["async_" .. N("greet")].params)
    -- No params declared: any arguments; an empty list: none.
    assert.is_nil(by["async_" .. N("anything")].params)
    assert.same({}, by["sync_" .. N("tick")].params)
    assert.equal("sync", by["sync_" .. N("tick")].ftype)
    assert.same({ ["x-overflow"] = "reject-publish" }, by["sync_" .. N("tick")].queue_arguments)
    -- The broker's own view of the queue agrees.
    local q = H.queues()["rpc_async_" .. N("add")]
    assert.equal(100, q.arguments["x-max-length"])
    assert.equal(10000, q.arguments["x-message-ttl"])
  end)

  it("prints a table for people: a row per function with its params and counts", function()
    local res = list()
    assert.equal(0, res.code, res.stderr)
    assert.matches("^FUNCTION +FTYPE +PARAMS +CONSUMERS +WAITING +QUEUE ARGUMENTS +HOSTS\n", res.stdout)
    local add = row(res.stdout, N("add"))
    assert.is_string(add, res.stdout)
    assert.matches(" async +a:number, b:number +3 +0 +x%-max%-length=100 x%-message%-ttl=10000 "
      .. "x%-overflow=reject%-publish +", add)
    assert.matches("%(pid " .. h1:pid() .. ", 2 workers%)", add)
    assert.matches("%(pid " .. h2:pid() .. ", 1 worker%)", add)
    assert.matches(" async +%.%.%. +3 ", row(res.stdout, N("anything")))
    assert.matches("%d+ rabihost workers answered", res.stderr)
  end)

  it("counts the calls waiting in a queue", function()
    local rabi = H.rabi()
    local client = H.client()
    -- One call at a time per worker (fetch_size 1), three workers: the
    -- other calls wait in the queue.
    local tasks = {}
    for i = 1, 7 do tasks[i] = rabi.spawn(function() return client:remote_call(N("slow"), { 2 }) end) end
    rabi.sleep(1)
    local by = list_json { N("slow") }
    local slow = by["async_" .. N("slow")]
    for _, t in ipairs(tasks) do rabi.wait(t) end
    client:close()
    assert.is_table(slow)
    assert.equal(3, slow.consumers)
    assert.equal(4, slow.messages)
  end)

  it("with names, lists only those, and exits 1 for a name nothing serves", function()
    local by, doc = list_json { N("add") }
    assert.equal(1, #doc.functions)
    assert.is_table(by["async_" .. N("add")])
    local res = list { N("add"), N("no_such_function") }
    assert.equal(1, res.code)
    assert.matches("no function " .. N("no_such_function"):gsub("%p", "%%%0") .. " is served", res.stderr)
    assert.is_string(row(res.stdout, N("add")))
  end)

  it("never delivers a discovery request to a function's queue, nor lists itself", function()
    local before = h1:log_count("outcome")
    for _ = 1, 3 do list_json() end
    local by = list_json()
    for key, f in pairs(by) do
      assert.is_nil(f.queue:match("^amq%."), key)
      assert.is_truthy(f.queue:match("^rpc_"), key)
    end
    -- --access-log writes one line per call served: the listings made none.
    assert.equal(before, h1:log_count("outcome"))
    -- Each worker's discovery queue is its own, gone with it; the function
    -- queues hold no stray request.
    local queues = H.queues()
    for _, base in ipairs { "add", "greet", "anything" } do
      local q = queues["rpc_async_" .. N(base)]
      assert.equal(0, q.messages_ready + q.messages_unacknowledged, base)
    end
  end)

  it("answers again after a worker's connection is lost and comes back", function()
    local conn
    for _, c in ipairs(H.connections()) do
      if c.name and c.name:match("^rabihost worker") then
        local ports = H.broker_ports_of(h2:worker_pids()[1])
        for _, p in ipairs(ports) do if p == c.peer_port then conn = c end end
      end
    end
    assert.is_table(conn, "no connection of the second host's worker")
    H.close_connection(conn.pid)
    assert(H.wait_until(function() return h2:log():match("reconnected; serving again") end, 20),
      "the worker did not reconnect:\n" .. h2:log())
    local add = list_json()["async_" .. N("add")]
    local from_h2 = 0
    for _, h in ipairs(add.hosts) do
      if h.supervisor == h2:pid() then from_h2 = from_h2 + 1 end
    end
    assert.equal(1, from_h2)
    assert.equal(3, add.consumers)
  end)

  describe("the Lua API", function()
    it("rabi.discover returns what rabihost list --json prints", function()
      local rabi = H.rabi()
      local client = rabi.client { url = H.url } -- not connected: discover needs only its settings
      local fns, summary = rabi.discover(client, { wait = 1 })
      assert.is_table(fns, tostring(summary))
      assert.equal(3, summary.answered)
      assert.is_true(summary.routed)
      local by = list_json()
      local mine = 0
      for _, f in ipairs(fns) do
        local other = by[f.ftype .. "_" .. f.name]
        if f.name:sub(-#S) == S then
          mine = mine + 1
          assert.is_table(other, f.name)
          assert.same(other.params, f.params)
          assert.same(other.queue_arguments, f.queue_arguments)
          assert.equal(other.consumers, f.consumers)
          assert.equal(#other.hosts, #f.hosts)
        end
      end
      assert.equal(5, mine)
      -- Sorted by name, then ftype.
      for i = 2, #fns do
        assert.is_true(fns[i - 1].name < fns[i].name
          or (fns[i - 1].name == fns[i].name and fns[i - 1].ftype <= fns[i].ftype))
      end
    end)

    it("raises on what is not a client or a bad option, naming it", function()
      local rabi = H.rabi()
      local ok, err = pcall(rabi.discover, "amqp://x")
      assert.is_false(ok)
      assert.matches("discover: bad argument #1: a client (rabi.client{...}) expected, got string", err, 1, true)
      ok, err = pcall(rabi.discover, rabi.client { url = H.url }, { wait = -1 })
      assert.is_false(ok)
      assert.matches("discover: option 'wait': a finite number of seconds >= 0 expected, got -1", err, 1, true)
      ok, err = pcall(rabi.discover, rabi.client { url = H.url }, { wiat = 1 })
      assert.is_false(ok)
      assert.matches("discover: unknown option 'wiat' (did you mean 'wait'?)", err, 1, true)
    end)

    it("fails with kind connection when the broker cannot be reached", function()
      local rabi = H.rabi()
      local fns, err = rabi.discover(rabi.client { url = H.dead_url })
      assert.is_nil(fns)
      assert.equal("connection", err.kind)
    end)
  end)

  describe("beside a Python RabiBridge server", function()
    local stop_py
    setup(function() stop_py = start_py_server(S) end)
    teardown(function() if stop_py then stop_py() end end)

    it("leaves out its functions, which do not answer, and the peer serves on", function()
      local by = list_json()
      assert.is_nil(by["async_py_add" .. S])
      assert.is_table(by["async_" .. N("add")])
      local client = H.client()
      assert.equal(5, client:remote_call("py_add" .. S, { 2, 3 }))
      client:close()
    end)

    it("looks a named Python function's queue up, and says it knows nothing more", function()
      local by = list_json { "py_add" .. S }
      local f = by["async_py_add" .. S]
      assert.is_table(f)
      assert.is_false(f.known)
      assert.equal(1, f.consumers)
      assert.is_nil(f.params)
      assert.same({}, f.hosts)
      local res = list { "py_add" .. S }
      assert.equal(0, res.code, res.stderr)
      assert.matches(" async +%? +1 +0 +%? +not a rabihost", row(res.stdout, "py_add" .. S))
    end)
  end)
end)

-- Running services in production (issue 3): workers, restarts, graceful
-- drain, hot reload, validate and params, rabi.store and on_start,
-- deadlines, re_register, logs. Every test checks what a user running
-- rabihost would check: the calls' outcomes, the host's log, the broker.
local H = require "helper"
local cjson = require "cjson"

local FIX = "spec/fixtures/production"
local rabi

-- ---- helpers ----

local function count(text, pattern, plain)
  local n, init = 0, 1
  while true do
    local s, e = text:find(pattern, init, plain)
    if not s then return n end
    n, init = n + 1, e + 1
  end
end

-- The pids that logged "serving" for worker w ("w0"), in order.
local function serving_pids(host, w)
  local out = {}
  for pid in host:log():gmatch("%[(%d+) " .. (w or "w%d+") .. "%] serving %d+ function") do
    out[#out + 1] = tonumber(pid)
  end
  return out
end

local drive_until = H.drive_until

-- `ntasks` tasks, each calling name(args) again and again with
-- try_remote_call until :stop(). -> loop; loop:stop() -> results, each
-- { success =, code =, value =, at = }
local function call_loop(client, ntasks, name, args)
  local loop = { running = true, results = {}, tasks = {} }
  for i = 1, ntasks do
    loop.tasks[i] = rabi.spawn(function()
      while loop.running do
        local success, code, value = client:try_remote_call(name, args or {})
        loop.results[#loop.results + 1] = { success = success, code = code, value = value, at = H.now() }
      end
    end)
  end
  function loop:stop()
    self.running = false
    for _, t in ipairs(self.tasks) do
      local ok, err = rabi.wait(t)
      assert(ok, "a call loop task failed: " .. tostring(err))
    end
    return self.results
  end
  return loop
end

-- -> number of failed calls, and a description of the first few
local function failures(results)
  local n, lines = 0, {}
  for i, r in ipairs(results) do
    if not (r.success and r.code == 0) then
      n = n + 1
      if #lines < 5 then lines[#lines + 1] = ("call %d: %s"):format(i, tostring(r.value):match("^[^\n]*")) end
    end
  end
  return n, ("%d of %d calls failed:\n  %s"):format(n, #results, table.concat(lines, "\n  "))
end

local function set_size(set)
  local n = 0
  for _ in pairs(set) do n = n + 1 end
  return n
end

-- Consumers of a queue on the broker (nil when it does not exist).
local function consumers(queue)
  for _, q in ipairs(cjson.decode(H.ctl("list_queues name consumers --formatter json"))) do
    if q.name == queue then return q.consumers end
  end
  return nil
end

local function proc_status(pid, field)
  local s = H.read_file("/proc/" .. pid .. "/status") or ""
  return tonumber(s:match(field .. ":%s*(%d+)"))
end

local function fd_count(pid)
  local res = H.run("ls /proc/" .. pid .. "/fd | wc -l")
  return tonumber(res.stdout:match("%d+"))
end

-- SIGKILL to a worker, only while that pid still runs rabihost. -> true if sent
local function kill9(pid) return H.signal_if(pid, "rabihost", 9) end

-- A fresh folder holding copies of a fixture's scripts, for --reload to
-- watch and the test to rewrite. -> its path
local function copy_fixture(stem, files)
  local dir = H.tmpname(stem)
  os.execute("mkdir -p " .. H.quote(dir) .. " && cp " .. files .. " " .. H.quote(dir))
  return dir
end

setup(function() rabi = H.rabi() end)

-- ---- one worker: validate, store, on_start, deadlines, log lines ----

describe("a host with one worker", function()
  local host, client
  local function N(base) return host:name(base) end
  local fx = H.host_fixture { dir = FIX, client = { timeout = 10 } }

  setup(function() host, client = fx:start() end)
  teardown(function() fx:stop() end)

  describe("validate", function()
    -- vtypes(n:integer, x:number, s:string, b:boolean, t:table, a:any,
    --        o:string?, p:integer?)
    local good = { 1, 2.5, "s", true, { 1 }, "anything" }

    local function copy_with(i, v)
      local args = {}
      for k, x in ipairs(good) do args[k] = x end
      args[i] = v
      return args
    end

    it("names the parameter, the expected type and the type received", function()
      local before = client:remote_call(N("vtypes_runs"), {})
      local cases = {
        { i = 1, v = "one", param = "n", expected = "integer", got = "string" },
        { i = 1, v = 1.5, param = "n", expected = "integer", got = "number" },
        { i = 2, v = "2.5x", param = "x", expected = "number", got = "string" },
        { i = 3, v = 3, param = "s", expected = "string", got = "integer" },
        { i = 4, v = "maybe", param = "b", expected = "boolean", got = "string" },
        { i = 5, v = "{}", param = "t", expected = "table", got = "string" },
        { i = 5, v = false, param = "t", expected = "table", got = "boolean" },
      }
      for _, c in ipairs(cases) do
        local what = ("%s given %s"):format(c.param, cjson.encode(c.v))
        local e = H.catch(client.remote_call, client, N("vtypes"), copy_with(c.i, c.v))
        assert.is_table(e, what .. " was accepted")
        assert.equal("remote", e.kind, what)
        assert.matches("'" .. c.param .. "'", e.message, 1, true)
        assert.matches(c.expected, e.message, 1, true)
        assert.matches(c.got, (e.message:gsub(c.expected, "", 1)), 1, true)
      end
      assert.equal(before, client:remote_call(N("vtypes_runs"), {}), "a refused call reached the handler")
    end)

    it("accepts any value for 'any', and whole floats for integer", function()
      for _, v in ipairs { 1, "x", true, { a = 1 }, rabi.array { 1, 2 } } do
        local r = client:remote_call(N("vtypes"), copy_with(6, v))
        assert.same(type(v), type(r.a))
      end
      assert.equal(3, client:remote_call(N("vtypes"), copy_with(1, 3.0)).n)
    end)

    it("lets optional '?' parameters be left out, passed as null, or given by keyword", function()
      local r = client:remote_call(N("vtypes"), good)
      assert.equal("none", r.o)
      assert.equal(-1, r.p)
      local with_nulls = copy_with(7, rabi.null)
      with_nulls[8] = rabi.null
      r = client:remote_call(N("vtypes"), with_nulls)
      assert.equal("none", r.o)
      assert.equal(-1, r.p)
      r = client:remote_call(N("vtypes"), good, { p = 7 })
      assert.equal("none", r.o)
      assert.equal(7, r.p)
      r = client:remote_call(N("vtypes"), copy_with(7, "given"))
      assert.equal("given", r.o)
    end)

    it("checks the type of an optional parameter that is given, by position or keyword", function()
      local e = H.catch(client.remote_call, client, N("vtypes"), copy_with(7, 5))
      assert.is_table(e, "o = 5 was accepted")
      assert.equal("remote", e.kind)
      assert.matches("'o'", e.message, 1, true)
      assert.matches("string", e.message, 1, true)
      assert.matches("integer", e.message, 1, true)
      e = H.catch(client.remote_call, client, N("vtypes"), good, { p = "seven" })
      assert.is_table(e, "p = 'seven' by keyword was accepted")
      assert.equal("remote", e.kind)
      assert.matches("'p'", e.message, 1, true)
      assert.matches("integer", e.message, 1, true)
      assert.matches("string", e.message, 1, true)
    end)

    it("refuses too many arguments, too few, and an unknown keyword, saying which", function()
      local before = client:remote_call(N("vtypes_runs"), {})
      local many = copy_with(7, "o")
      many[8], many[9] = 8, 9
      local e = H.catch(client.remote_call, client, N("vtypes"), many)
      assert.equal("remote", e and e.kind)
      assert.matches("at most 8", e.message, 1, true)
      assert.matches("9", (e.message:gsub("at most 8", "")), 1, true)

      e = H.catch(client.remote_call, client, N("vtypes"), { 1, 2.5, "s" })
      assert.equal("remote", e and e.kind)
      assert.matches("'b'", e.message, 1, true)
      assert.matches("missing", e.message, 1, true)

      e = H.catch(client.remote_call, client, N("vtypes"), good, { colour = "red" })
      assert.equal("remote", e and e.kind)
      assert.matches("'colour'", e.message, 1, true)
      assert.equal(before, client:remote_call(N("vtypes_runs"), {}), "a refused call reached the handler")
    end)
  end)

  describe("rabi.store and rabi.on_start", function()
    it("share one store between the services of a worker", function()
      local key, value = "k" .. H.random_hex(3), { n = 42, list = rabi.array { "a", "b" } }
      assert.is_true(client:remote_call(N("store_put"), { key, value })) -- store_a.lua
      assert.same(value, client:remote_call(N("store_read"), { key }))   -- store_b.lua
      local unset = client:remote_call(N("store_read"), { "never-set" })
      assert.is_true(unset == nil or unset == rabi.null, "a key never set reads " .. tostring(unset))
    end)

    it("run on_start once, before the worker consumes, and its store writes are seen", function()
      local r = client:remote_call(N("started"), {})
      assert.is_true(r.started)
      assert.equal(1, r.runs)
      local log = host:log()
      local hook_at = log:find("spec on_start ran in pid " .. r.pid, 1, true)
      local serving_at = log:find("[" .. r.pid .. " w0] serving", 1, true)
      assert.is_number(hook_at, "the hook's log line is missing:\n" .. log)
      assert.is_number(serving_at)
      assert.is_true(hook_at < serving_at, "the worker consumed before its on_start hook ran:\n" .. log)
      assert.equal(1, count(log, "spec on_start ran in pid", true))
    end)
  end)

  describe("deadlines", function()
    it("a request that waited in the queue past its caller's timeout never runs", function()
      local before = client:remote_call(N("deadline_count"), {})
      -- fetch_size 1 and 2 s each: the first call (4 s timeout) holds the
      -- worker, so the second and third (1 s timeout) wait in the queue
      -- past their deadlines. The first must outlive its own sleep: a
      -- handler's sleep is cancelled at its caller's deadline, and a first
      -- call that ended at 1 s would free the worker just as the others'
      -- deadlines fall due, which made this race.
      local results = H.concurrently(3, function(i)
        return client:remote_call(N("deadline_slow"), { "call" .. i }, nil, nil, { timeout = i == 1 and 4 or 1 })
      end)
      assert.is_true(results[1].ok, "the first call was not answered: " .. tostring(results[1].value))
      for i = 2, 3 do
        assert.is_false(results[i].ok, "call " .. i .. " was answered within its 1 s timeout")
        assert.equal("timeout", results[i].value.kind)
      end
      -- give the queued ones time to run if they (wrongly) would
      rabi.sleep(2.5)
      local ran = client:remote_call(N("deadline_count"), {}) - before
      assert.equal(1, ran, ("the handler ran %d times; only the first call's caller was still waiting"):format(ran))
    end)

    it("a worker that takes a request after its caller gave up skips it and logs so", function()
      local before = client:remote_call(N("busy_count"), {})
      -- deadline_busy holds the worker for 1.5 s: the two requests delivered
      -- meanwhile are taken after their callers' 1 s deadline.
      local results = H.concurrently(3, function()
        return client:remote_call(N("deadline_busy"), { 1.5 }, nil, nil, { timeout = 1 })
      end)
      for i, r in ipairs(results) do assert.is_false(r.ok, "call " .. i .. " was answered") end
      local skipped = H.wait_until(function()
        return count(host:log(), N("deadline_busy") .. ": skipped cid", true) >= 2
      end, 5)
      assert.is_truthy(skipped, "no 'skipped' line for the two late requests:\n" .. host:log())
      assert.equal(1, client:remote_call(N("busy_count"), {}) - before)
    end)

    it("cancels a handler's sleep when its caller's deadline passes", function()
      local ok, _, err = client:try_remote_call(N("deadline_waits"), { 5 }, nil, nil, { timeout = 0.5 })
      assert.is_false(ok)
      assert.equal("timeout", err.kind)
      local line = H.wait_until(function() return host:log():match("spec deadline_waits: [^\n]*") end, 5)
      assert.is_string(line, "the handler never logged how its sleep ended:\n" .. host:log())
      local how, after, kind = line:match("sleep (%a+) after ([%d.]+) s %((%a+)%)")
      assert.equal("failed", how, line)
      assert.equal("cancelled", kind, line)
      assert.is_true(tonumber(after) < 1.5, "the sleep ran on past its caller's deadline: " .. line)
    end)

    it("gives a nested call at most the time its caller has left", function()
      local ok, _, err = client:try_remote_call(N("deadline_nested"), {}, nil, nil, { timeout = 1 })
      assert.is_false(ok)
      assert.equal("timeout", err.kind)
      local line = H.wait_until(function() return host:log():match("spec deadline_nested: [^\n]*") end, 8)
      assert.is_string(line, "the handler never logged how its nested call ended:\n" .. host:log())
      local how, after, kind = line:match("nested call (%a+) after ([%d.]+) s %((%a+):")
      assert.equal("failed", how, line)
      -- Its clipped timeout and the deadline's cancellation fall due at
      -- the same moment: either may end it, and both say why.
      assert.is_truthy(kind == "timeout" or kind == "cancelled", line)
      assert.is_true(tonumber(after) < 1.5, "the nested call waited past its caller's deadline: " .. line)
      assert.matches("caller's deadline", line, 1, true)
    end)
  end)

  describe("log lines", function()
    it("carry the time, the level, the pid and the worker", function()
      local pid = client:remote_call(N("pid"), {})
      local log = host:log()
      local n, worker_lines = 0, 0
      for line in log:gmatch("[^\n]+") do
        n = n + 1
        local stamp, level, who = line:match("^(%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ) (%u+) +%[([^%]]+)%] ")
        assert.is_string(stamp, "no timestamp, level and [pid] in: " .. line)
        assert.is_truthy(({ DEBUG = 1, INFO = 1, WARN = 1, ERROR = 1 })[level], "level " .. level)
        local p, w = who:match("^(%d+) w(%d+)$")
        if p then
          worker_lines = worker_lines + 1
          assert.equal(pid, tonumber(p), "a worker line with another pid: " .. line)
          assert.equal("0", w)
        else
          assert.equal(host:pid(), tonumber(who:match("^(%d+)$")), "a supervisor line without its pid: " .. line)
        end
      end
      assert.is_true(n >= 3 and worker_lines >= 2, "too few log lines:\n" .. log)
      assert.not_matches("served cid", log, 1, true) -- per-call lines are DEBUG
    end)
  end)
end)

describe("--log-level DEBUG", function()
  teardown(function() H.stop_all() end)

  it("logs each call with its function's name and correlation id", function()
    local host = H.start { dir = FIX, args = { "--log-level", "DEBUG" } }
    -- A raw publish, so that the correlation id is known: 1001.
    local out = H.raw_publish({ { routing_key = "async_" .. host:name("pid"), body = "[[],{}]" } }, 10)
    assert.is_true(out[1].replied, "no reply")
    local line = H.wait_until(function()
      return host:log():match("[^\n]*" .. host:name("pid") .. "[^\n]*cid 1001[^\n]*")
    end, 5)
    assert.is_string(line, "no line for the call:\n" .. host:log())
    assert.matches("DEBUG", line, 1, true)
    assert.matches("%[%d+ w0%]", line)
    assert.matches("%d+ ms", line)
    assert.equal(0, host:stop())
  end)
end)

-- ---- several workers ----

describe("-w 2", function()
  local host, client
  local fx = H.host_fixture { dir = FIX, args = { "-w", "2" }, client = { timeout = 10 } }
  setup(function()
    host, client = fx:start()
    assert(H.wait_until(function() return #serving_pids(host) >= 2 end, 15), "two workers did not serve:\n" .. host:log())
  end)
  teardown(function() fx:stop() end)

  it("spreads 200 concurrent calls over both workers", function()
    local results = H.concurrently(200, function() return client:remote_call(host:name("pid"), {}) end)
    local pids = {}
    for i, r in ipairs(results) do
      assert.is_true(r.ok, "call " .. i .. ": " .. tostring(r.value))
      pids[r.value] = (pids[r.value] or 0) + 1
    end
    local seen = {}
    for pid, n in pairs(pids) do seen[#seen + 1] = ("pid %d: %d calls"):format(pid, n) end
    assert.equal(2, set_size(pids), "calls went to " .. table.concat(seen, ", "))
    local workers = serving_pids(host)
    for pid in pairs(pids) do
      assert.is_truthy(pid == workers[1] or pid == workers[2], "pid " .. pid .. " is not a worker")
    end
  end)

  it("runs on_start once in each worker, each with its own store", function()
    local seen = {}
    local results = H.concurrently(60, function() return client:remote_call(host:name("started"), {}) end)
    for i, r in ipairs(results) do
      assert.is_true(r.ok, "call " .. i .. ": " .. tostring(r.value))
      assert.is_true(r.value.started)
      assert.equal(1, r.value.runs, "on_start ran more than once in pid " .. r.value.pid)
      seen[r.value.pid] = true
    end
    assert.equal(2, set_size(seen))
    for _, pid in ipairs(serving_pids(host)) do
      assert.equal(1, count(host:log(), "spec on_start ran in pid " .. pid, true))
    end
  end)
end)

-- ---- a worker killed under load ----

describe("kill -9 of a worker under a call loop", function()
  teardown(function() H.stop_all() end)

  -- Four tasks call slow_pid (0.2 s) in a loop; worker 0 is killed while
  -- calls are in flight on it.
  local function killed_under_load(workers, extra_args)
    local args = { "-w", tostring(workers) }
    for _, a in ipairs(extra_args or {}) do args[#args + 1] = a end
    local host = H.start { dir = FIX, args = args }
    assert(H.wait_until(function() return #serving_pids(host) >= workers end, 15))
    local victim = serving_pids(host, "w0")[1]
    local client = H.client { timeout = 10 }
    local loop = call_loop(client, 4, host:name("slow_pid"), { 0.2 })
    rabi.sleep(1)
    assert.is_true(kill9(victim))
    local restarted = drive_until(function() return serving_pids(host, "w0")[2] end, 10)
    -- keep calling for a while on the new worker
    rabi.sleep(1.5)
    local results = loop:stop()
    client:close()
    local log = host:log()
    assert.is_number(restarted, "worker 0 was not restarted:\n" .. log)
    assert.matches("worker 0 %(pid " .. victim .. "%) killed by signal 9[^\n]*restarting in", log)
    local nfailed, why = failures(results)
    local by_new = 0
    for _, r in ipairs(results) do
      if r.success and r.value == restarted then by_new = by_new + 1 end
    end
    assert.equal(0, host:stop())
    return nfailed, why, by_new, #results
  end

  it("with -w 2: the worker restarts, a new pid serves, and every call is answered", function()
    local nfailed, why, by_new, total = killed_under_load(2)
    assert.is_true(total >= 10, "only " .. total .. " calls were made")
    assert.equal(0, nfailed, why)
    assert.is_true(by_new > 0, "the restarted worker served no call")
  end)

  -- The requests in flight on the killed worker are unacked: the broker
  -- hands them to the restarted worker. The queues are durable by default,
  -- so with one worker the queue outlives that worker's connection (with
  -- RabiBridge's auto-delete queues it would go, requests and all).
  it("with -w 1: the worker restarts and every call is answered", function()
    local nfailed, why, by_new, total = killed_under_load(1)
    assert.is_true(total >= 4, "only " .. total .. " calls were made")
    assert.equal(0, nfailed, why)
    assert.is_true(by_new > 0, "the restarted worker served no call")
  end)
end)

-- ---- graceful drain ----

describe("SIGTERM", function()
  teardown(function() H.stop_all() end)

  it("answers every call in flight, exits 0, and a call made after waits in the queue for the next host",
    function()
    local host = H.start { dir = FIX, args = { "--drain-timeout=10" } }
    local client = H.client { timeout = 10 }
    local name = host:name("slow_pid")
    local tasks = {}
    for i = 1, 6 do tasks[i] = rabi.spawn(function() return client:remote_call(name, { 1 }) end) end
    rabi.sleep(0.4) -- all six are running in the worker
    host:kill("TERM")
    local worker = serving_pids(host, "w0")[1]
    for i, t in ipairs(tasks) do
      local ok, v = rabi.wait(t)
      assert.is_true(ok, "call " .. i .. " in flight failed: " .. tostring(v))
      assert.equal(worker, v)
    end
    assert.equal(0, host:wait_exit(15))
    local later = rabi.spawn(function() return client:remote_call(name, { 0 }) end)
    rabi.sleep(0.5)
    local q = H.queues()["rpc_async_" .. name]
    assert.is_table(q, "the queue went with the host")
    assert.equal(0, q.consumers)
    assert.equal(1, q.messages_ready, "the call made after the exit is not waiting in the queue")
    local next_host = H.start { dir = FIX, suffix = host.suffix }
    local ok, v = rabi.wait(later)
    client:close()
    assert.is_true(ok, "the call made between the hosts failed: " .. tostring(v))
    assert.equal(serving_pids(next_host, "w0")[1], v)
    next_host:stop()
  end)

  it("answers a call that outlives --drain-timeout with an error saying the worker stops", function()
    local suffix = H.new_suffix()
    local a = H.start { dir = FIX, suffix = suffix, args = { "--drain-timeout=1" } }
    local client = H.client { timeout = 20 }
    local t = rabi.spawn(function() return client:remote_call("slow_pid" .. suffix, { 10 }) end)
    rabi.sleep(0.3) -- taken by a, the only consumer
    local t0 = H.now()
    a:kill("TERM")
    local ok, err = rabi.wait(t)
    local elapsed = H.now() - t0
    client:close()
    assert.is_false(ok, "the call was answered as if it had finished")
    assert.equal("remote", err.kind, tostring(err))
    assert.matches("the worker is stopping", err.message, 1, true)
    assert.is_true(elapsed < 5, ("answered %.1f s after SIGTERM with --drain-timeout=1"):format(elapsed))
    assert.equal(0, a:wait_exit(10))
    assert.matches("drain timed out", a:log(), 1, true)
  end)

  -- The requests waiting in the queue behind fetch_size were accepted by
  -- the broker too: the only host draining must not drop them silently.
  -- Its queue being durable, it leaves them there for the next host.
  it("leaves the calls waiting in the queue behind fetch_size to the next host when it is the only consumer",
    function()
    local host = H.start { dir = FIX, args = { "--drain-timeout=10" } }
    local client = H.client { timeout = 15 }
    local name = host:name("one_at_a_time")
    local tasks = {}
    for i = 1, 3 do tasks[i] = rabi.spawn(function() return client:try_remote_call(name, { 1 }) end) end
    rabi.sleep(0.3) -- one runs, two wait in the queue
    host:kill("TERM")
    assert.equal(0, host:wait_exit(15))
    local next_host = H.start { dir = FIX, suffix = host.suffix }
    local next_pid = serving_pids(next_host, "w0")[1]
    local lost, by_next = {}, 0
    for i, t in ipairs(tasks) do
      local ok, success, code, v = rabi.wait(t)
      assert.is_true(ok, tostring(success))
      if not (success and code == 0) then lost[#lost + 1] = ("call %d: %s"):format(i, tostring(v)) end
      if v == next_pid then by_next = by_next + 1 end
    end
    client:close()
    next_host:stop()
    assert.equal(0, #lost, #lost .. " of 3 calls were not answered:\n  " .. table.concat(lost, "\n  "))
    assert.equal(2, by_next, "the next host did not serve the two queued calls")
  end)

  -- RabiBridge's auto-delete queue goes with its last consumer, and the
  -- calls in it: the only host draining serves them first (within
  -- --drain-timeout).
  it("with queue_auto_delete = true: answers the calls waiting in the queue behind fetch_size itself",
    function()
    local cfg = H.tmpname("autodelete") .. ".lua"
    H.write_file(cfg, "app = { queue_auto_delete = true }\n")
    local host = H.start { dir = FIX, args = { "--drain-timeout=10", "-c", cfg } }
    local client = H.client { timeout = 8 }
    local name = host:name("one_at_a_time")
    local tasks = {}
    for i = 1, 3 do tasks[i] = rabi.spawn(function() return client:try_remote_call(name, { 1 }) end) end
    rabi.sleep(0.3) -- one runs, two wait in the queue
    host:kill("TERM")
    local lost = {}
    for i, t in ipairs(tasks) do
      local ok, success, code, v = rabi.wait(t)
      assert.is_true(ok, tostring(success))
      if not (success and code == 0) then lost[#lost + 1] = ("call %d: %s"):format(i, tostring(v)) end
    end
    client:close()
    assert.equal(0, host:wait_exit(15))
    assert.equal(0, #lost, #lost .. " of 3 calls were not answered:\n  " .. table.concat(lost, "\n  "))
  end)
end)

-- ---- on_start that fails ----

describe("an on_start hook that raises", function()
  teardown(function() H.stop_all() end)
  local DIR = FIX .. "_onstart_fail"

  local function hook_line(log)
    return log:match("[^\n]*on_start[^\n]*")
  end

  it("at start-up stops rabihost with a clear message and a non-zero exit, serving nothing", function()
    local host = H.start { dir = DIR, wait = false }
    local code = host:wait_exit(15)
    local log = host:log()
    assert.is_number(code, "rabihost did not exit:\n" .. log)
    assert.is_true(code ~= 0, "exit code 0 after a failed on_start")
    local line = hook_line(log)
    assert.is_string(line, "no line about the hook:\n" .. log)
    assert.matches("ERROR", line, 1, true)
    assert.matches("spec on_start cannot open its database", line, 1, true)
    assert.matches("production_onstart_fail/boom.lua:10:", line, 1, true)
    assert.not_matches("serving %d+ function", log)
  end)

  -- "One line per event": a traceback spread over several lines loses the
  -- time, level, pid and worker on all but its first line.
  it("reports the failure on lines that each carry the time, the level and the pid", function()
    local host = H.start { dir = DIR, wait = false }
    assert.is_number(host:wait_exit(15))
    local log = host:log()
    assert.is_string(log:match("on_start"), "no line about the hook:\n" .. log)
    for line in log:gmatch("[^\n]+") do
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT[%d:%.]+Z %u+ +%[%d+[^%]]*%] ", line)
    end
  end)

  it("when a restarted worker's hook fails, the supervisor backs off, and the worker serves once it passes",
    function()
      local flag = H.tmpname("onstart-fail")
      local host = H.start { dir = DIR, env = { RABI_SPEC_ONSTART_FAIL = flag } }
      local client = H.client { timeout = 5 }
      assert.equal("hooked", client:remote_call(host:name("hooked"), {}))
      H.write_file(flag, "fail\n") -- the database goes away
      assert.is_true(kill9(serving_pids(host, "w0")[1]))
      local log = H.wait_until(function()
        local l = host:log()
        return count(l, "exited with status %d+; restarting in") >= 3 and l
      end, 15)
      assert.is_string(log, "the worker was not restarted 3 times:\n" .. host:log())
      local line = hook_line(log)
      assert.is_string(line, "no line about the hook:\n" .. log)
      assert.matches("ERROR", line, 1, true)
      assert.matches("spec on_start cannot open its database", line, 1, true)
      local delays = {}
      for d in log:gmatch("restarting in ([%d%.]+) s") do delays[#delays + 1] = tonumber(d) end
      for i = 2, #delays do
        assert.is_true(delays[i] > delays[i - 1], "no backoff: " .. table.concat(delays, ", "))
      end
      os.remove(flag) -- the database is back
      local back = H.wait_until(function() return serving_pids(host, "w0")[2] end, 15)
      assert.is_number(back, "the worker never served again:\n" .. host:log())
      assert.equal("hooked", client:remote_call(host:name("hooked"), {}))
      client:close()
      assert.equal(0, host:stop())
    end)
end)

-- ---- hot reload ----

describe("--reload", function()
  teardown(function() H.stop_all() end)

  local VALUE = [[
-- version %d
local rabi = require "rabibridge"
local S = os.getenv("RABI_SPEC_SUFFIX") or ""

rabi.register_call("value" .. S, { fetch_size = 64 }, function() return %d end)
]]

  it("20 reloads under a call loop: no failed call, new and removed functions, broken scripts", function()
    local dir = copy_fixture("reload", FIX .. "_reload/*.lua")
    local cfg = H.tmpname("expires") .. ".lua"
    H.write_file(cfg, "app = { queue_expires = 2 }\n")
    local host = H.start { dir = dir, args = { "--reload", "-c", cfg }, functions = 2 }
    local sup = host:pid()
    local client = H.client { timeout = 10 }
    local value, doomed = host:name("value"), host:name("doomed")
    assert.equal(0, client:remote_call(value, {}))
    local rss0, fds0 = proc_status(sup, "VmRSS"), fd_count(sup)

    local function reloads() return count(host:log(), "reloaded: generation", true) end
    local function change(what)
      local n0 = reloads()
      what()
      local ok = drive_until(function() return reloads() > n0 end, 15)
      assert.is_truthy(ok, "no reload after the change:\n" .. host:log())
    end

    local loop = call_loop(client, 2, value)
    for v = 1, 20 do
      change(function() H.write_file(dir .. "/value.lua", VALUE:format(v, v)) end)
    end
    assert.equal(20, drive_until(function()
      local r = client:remote_call(value, {})
      return r == 20 and r
    end, 5), "the last version does not serve")

    -- a function added while running becomes callable
    change(function()
      H.write_file(dir .. "/added.lua", ([[
local rabi = require "rabibridge"
rabi.register_call("added" .. os.getenv("RABI_SPEC_SUFFIX"), {}, function() return "added" end)
]]))
    end)
    assert.equal("added", client:remote_call(host:name("added"), {}))

    -- a broken script is reported, and the running code keeps serving
    local failed0 = count(host:log(), "reload failed", true)
    H.write_file(dir .. "/broken.lua", "local rabi = require 'rabibridge'\n\nlocal x = = 1\n")
    assert.is_truthy(drive_until(function() return count(host:log(), "reload failed", true) > failed0 end, 15),
      "the broken script was not noticed:\n" .. host:log())
    assert.matches(dir .. "/broken.lua:3:", host:log(), 1, true)
    assert.equal(20, client:remote_call(value, {}))
    assert.equal("added", client:remote_call(host:name("added"), {}))

    -- once fixed (removed), reloads work again; a removed function goes
    change(function() os.remove(dir .. "/broken.lua") end)
    assert.equal("doomed", client:remote_call(doomed, {}))
    change(function() os.remove(dir .. "/doomed.lua") end)
    -- (its queue goes once unused for app.queue_expires: 2 s here)
    local gone = drive_until(function()
      local e = H.catch(client.remote_call, client, doomed, {}, nil, nil, { timeout = 1 })
      return e and e.kind == "no_route"
    end, 15)
    assert.is_true(gone, "the removed function is still served")

    local results = loop:stop()
    local nfailed, why = failures(results)
    assert.is_true(#results > 100, "only " .. #results .. " calls in the loop")
    assert.equal(0, nfailed, why)
    assert.equal(20, results[#results].value)
    assert.equal(20, client:remote_call(value, {}))
    client:close()

    -- the supervisor does not grow across reloads: no leaked pipe or watch,
    -- no memory kept per generation
    rabi.sleep(1) -- the last old generation exits
    assert.is_true(fd_count(sup) <= fds0, ("supervisor fds: %d before, %d after"):format(fds0, fd_count(sup)))
    local rss1 = proc_status(sup, "VmRSS")
    assert.is_true(rss1 - rss0 < 2048, ("supervisor RSS grew from %d kB to %d kB"):format(rss0, rss1))
    assert.equal(0, host:stop())
  end)

  it("watches a folder created under a watched one after the start", function()
    local dir = copy_fixture("reload-sub", FIX .. "_reload/value.lua")
    local host = H.start { dir = dir, args = { "--reload" }, functions = 1 }
    local client = H.client { timeout = 10 }
    os.execute("mkdir " .. H.quote(dir .. "/later"))
    rabi.sleep(0.5) -- the new folder's own reload settles
    H.write_file(dir .. "/later/deep.lua", [[
local rabi = require "rabibridge"
rabi.register_call("deep" .. os.getenv("RABI_SPEC_SUFFIX"), {}, function() return "deep" end)
]])
    local served = drive_until(function()
      local ok, v = pcall(client.remote_call, client, host:name("deep"), {})
      return ok and v
    end, 15)
    client:close()
    assert.equal("deep", served, "a script in the new folder is not served:\n" .. host:log())
    assert.equal(0, host:stop())
  end)
end)

-- ---- re_register ----

describe("re_register", function()
  teardown(function() H.stop_all() end)
  local DIR = FIX .. "_reregister"

  it("without it, changed arguments are reported clearly and the other functions serve; with it, the queue is replaced",
    function()
      local suffix = H.new_suffix()
      local queue = "rpc_async_sized" .. suffix
      local a = H.start { dir = DIR, suffix = suffix, env = { RABI_SPEC_QUEUE_SIZE = "5" }, functions = 2 }
      assert.equal(5, H.queues()[queue].arguments["x-max-length"])

      local b = H.start { dir = DIR, suffix = suffix, env = { RABI_SPEC_QUEUE_SIZE = "10" } }
      assert.equal(1, b.serving)
      local line = b:log():match("[^\n]*ERROR[^\n]*sized" .. suffix .. "[^\n]*")
      assert.is_string(line, "no error naming the function:\n" .. b:log())
      assert.matches(queue, line, 1, true)
      assert.matches("x-max-length", line, 1, true)
      assert.matches("re_register = true", line, 1, true)
      assert.matches("delet", line, 1, true)
      local client = H.client { timeout = 5 }
      assert.equal("steady", client:remote_call("steady" .. suffix, {}))
      assert.equal(5, client:remote_call("sized" .. suffix, {}))
      assert.equal(0, b:stop())

      local c = H.start { dir = DIR, suffix = suffix,
        env = { RABI_SPEC_QUEUE_SIZE = "10", RABI_SPEC_REREGISTER = "1" }, functions = 2 }
      assert.equal(10, H.queues()[queue].arguments["x-max-length"])
      assert.equal(10, client:remote_call("sized" .. suffix, {}))
      assert.equal("steady", client:remote_call("steady" .. suffix, {}))
      client:close()
      assert.equal(0, c:stop())
      assert.equal(0, a:stop())
    end)

  -- A peer (another host, or a Python server) that takes the queue over
  -- with other arguments must not stop this function for good: the worker
  -- retries with a growing pause and serves again once the queue is free.
  it("a worker whose queue was taken over with other arguments retries and serves again once it is free",
    function()
      local suffix = H.new_suffix()
      local queue = "rpc_async_sized" .. suffix
      local a = H.start { dir = DIR, suffix = suffix, env = { RABI_SPEC_QUEUE_SIZE = "5" }, functions = 2 }
      local b = H.start { dir = DIR, suffix = suffix,
        env = { RABI_SPEC_QUEUE_SIZE = "10", RABI_SPEC_REREGISTER = "1" }, functions = 2 }
      assert.equal(10, H.queues()[queue].arguments["x-max-length"])
      local refused = H.wait_until(function()
        return a:log():match("[^\n]*sized" .. suffix .. ": not serving: [^\n]*PRECONDITION_FAILED[^\n]*")
      end, 10)
      assert.is_string(refused, "the first host never said why it stopped serving:\n" .. a:log())
      assert.matches("retry 1 in 2 s", refused, 1, true)
      rabi.sleep(2.5) -- past its second try (at 1 s, then 3 s): the pause grows
      assert.equal(0, b:stop())
      pcall(H.ctl, "delete_queue " .. H.quote(queue)) -- gone already if it was auto-delete
      local again = H.wait_until(function()
        return a:log():match("sized" .. suffix .. ": serving again after (%d+) tries")
      end, 40)
      assert.is_string(again, "the first host never served its function again:\n" .. a:log())
      assert.is_true(tonumber(again) >= 2, "served again after " .. again .. " try")
      -- one line per change of reason, not one per retry
      local _, refusals = a:log():gsub("sized" .. suffix .. ": not serving:[^\n]*PRECONDITION_FAILED", "")
      assert.is_true(refusals <= 2, refusals .. " ERROR lines for one unchanged reason:\n" .. a:log())
      local client = H.client { timeout = 5 }
      assert.equal(5, client:remote_call("sized" .. suffix, {}))
      client:close()
      assert.equal(0, a:stop())
    end)

  -- re_register is to replace a queue whose arguments changed: a worker
  -- that declares the same arguments again must not delete the queue that
  -- its sibling workers consume.
  it("with -w 2, a restarted worker leaves its sibling consuming", function()
    local host = H.start { dir = DIR, args = { "-w", "2" },
      env = { RABI_SPEC_QUEUE_SIZE = "10", RABI_SPEC_REREGISTER = "1" } }
    assert(H.wait_until(function() return #serving_pids(host) >= 2 end, 15))
    local queue = "rpc_async_" .. host:name("sized")
    local victim = serving_pids(host, "w0")[1]
    assert.is_true(kill9(victim))
    assert(H.wait_until(function() return serving_pids(host, "w0")[2] end, 10), "w0 did not restart")
    local n = H.wait_until(function() return consumers(queue) == 2 and 2 end, 3) or consumers(queue)
    local log = host:log()
    assert.equal(2, n, ("%s has %s consumer(s) after worker 0 restarted:\n%s"):format(queue, tostring(n), log))
    assert.equal(0, host:stop())
  end)

  -- Same cause seen through --reload: the new generation deletes the queue
  -- the old one serves, and the calls waiting in it.
  it("--reload of a script with re_register = true loses no call waiting in the queue", function()
    local dir = copy_fixture("reload-rereg", FIX .. "_reload_rereg/*.lua")
    local host = H.start { dir = dir, args = { "--reload" }, functions = 1 }
    local client = H.client { timeout = 6 }
    local tasks = {}
    for i = 1, 4 do
      tasks[i] = rabi.spawn(function() return client:try_remote_call(host:name("rr"), {}) end)
    end
    rabi.sleep(0.2) -- one runs (0.5 s each), three wait in the queue
    H.write_file(dir .. "/rr.lua", H.read_file(dir .. "/rr.lua") .. "-- touched\n")
    local lost = {}
    for i, t in ipairs(tasks) do
      local ok, success, code, v = rabi.wait(t)
      assert.is_true(ok, tostring(success))
      if not (success and code == 0) then lost[#lost + 1] = ("call %d: %s"):format(i, tostring(v)) end
    end
    client:close()
    assert.matches("reloaded", host:log(), 1, true)
    assert.equal(0, #lost, #lost .. " of 4 calls were lost across the reload:\n  " .. table.concat(lost, "\n  "))
    assert.equal(0, host:stop())
  end)
end)

-- ---- a queue deleted under a worker ----

describe("a queue deleted on the broker while a worker consumes it", function()
  teardown(function() H.stop_all() end)

  -- An operator's delete_queue (or another host's re_register) cancels the
  -- worker's consumer: the worker must not go on silently serving nothing.
  it("is reported in the worker's log, naming the function", function()
    local host = H.start { dir = FIX .. "_reregister", functions = 2 }
    H.ctl("delete_queue " .. H.quote("rpc_async_" .. host:name("steady")))
    local line = H.wait_until(function()
      for l in host:log():gmatch("[^\n]+") do
        if l:find(host:name("steady"), 1, true) and l:match("^%S+ (%u+)") ~= "INFO" then return l end
      end
    end, 5)
    assert.is_string(line, "no warning or error about the deleted queue:\n" .. host:log())
    assert.equal(0, host:stop())
  end)
end)

-- Serving: queues, prefetch, coroutines, broken scripts, services calling
-- services, graceful stop. README: Running it in production.
local H = require "helper"

describe("serving", function()
  local host, client, rabi
  local function N(base) return host:name(base) end
  local fx = H.host_fixture { dir = "spec/fixtures/basic" }

  setup(function()
    rabi = H.rabi()
    host, client = fx:start()
  end)

  teardown(function() fx:stop() end)

  describe("queues on the broker", function()
    local queues
    setup(function() queues = H.queues() end)

    -- Durable and not auto-delete by default: the queue and the calls in
    -- it outlive a worker. What expires in it goes to rabihost.expired to
    -- be answered; unused for app.queue_expires (60 s), it goes.
    local DURABLE = {
      ["x-dead-letter-exchange"] = "", ["x-dead-letter-routing-key"] = "rabihost.expired", ["x-expires"] = 60000,
    }
    local function with_durable(args)
      for k, v in pairs(DURABLE) do args[k] = v end
      return args
    end

    it("declares rpc_async_NAME with x-overflow, x-message-ttl and x-max-length", function()
      local q = queues["rpc_async_" .. N("qargs")]
      assert.is_table(q, "queue rpc_async_" .. N("qargs") .. " is missing")
      assert.same(with_durable { ["x-overflow"] = "reject-publish", ["x-message-ttl"] = 3000, ["x-max-length"] = 7 },
        q.arguments)
      assert.is_true(q.durable)
      assert.is_false(q.auto_delete)
    end)

    it("declares only x-overflow for a function without queue_size or timeout", function()
      local q = queues["rpc_async_" .. N("echo")]
      assert.is_table(q)
      assert.same(with_durable { ["x-overflow"] = "reject-publish" }, q.arguments)
      assert.is_true(q.durable)
      assert.is_false(q.auto_delete)
    end)

    it("declares rabihost.expired, where the function queues dead-letter, and consumes it", function()
      local q = queues["rabihost.expired"]
      assert.is_table(q, "queue rabihost.expired is missing")
      assert.same({ ["x-message-ttl"] = 300000, ["x-max-length"] = 100000 }, q.arguments)
      assert.is_true(q.durable)
      assert.is_false(q.auto_delete)
      assert.is_true(q.consumers >= 1)
    end)

    it("declares rpc_sync_NAME (and no rpc_async_NAME) for ftype = 'sync'", function()
      assert.is_table(queues["rpc_sync_" .. N("syncfn")])
      assert.is_nil(queues["rpc_async_" .. N("syncfn")])
    end)
  end)

  it("serves a sync function under ftype 'sync' and not under 'async'", function()
    assert.equal("sync:x", client:remote_call(N("syncfn"), { "x" }, nil, "sync"))
    H.expect_error("no_route", client.remote_call, client, N("syncfn"), { "x" })
  end)

  it("logs how many functions it serves", function()
    -- values 8 + errors 2 + params 5 + timing 6 + gateway 1 + hooks 2
    assert.equal(24, host.serving)
    assert.matches("serving 24 functions", host:log(), 1, true)
  end)

  it("runs every call in its own coroutine: 20 one-second calls finish in a few seconds", function()
    local results, elapsed = H.concurrently(20, function()
      return client:remote_call(N("sleep"), { 1 })
    end)
    for i, r in ipairs(results) do
      assert.is_true(r.ok, "call " .. i .. " failed: " .. tostring(r.value))
      assert.equal(1, r.value.asked)
    end
    assert.is_true(elapsed >= 0.9, ("took %.2f s: the handler did not sleep"):format(elapsed))
    assert.is_true(elapsed < 6, ("20 one-second calls took %.2f s: they ran one after another"):format(elapsed))
  end)

  it("respects fetch_size: 6 one-second calls with fetch_size = 2 take about 3 s", function()
    local results, elapsed = H.concurrently(6, function()
      return client:remote_call(N("sleep2"), { 1 })
    end)
    for i, r in ipairs(results) do assert.is_true(r.ok, "call " .. i .. ": " .. tostring(r.value)) end
    assert.is_true(elapsed > 2.5, ("took %.2f s: more than 2 calls ran at once"):format(elapsed))
    assert.is_true(elapsed < 5.5, ("took %.2f s: fewer than 2 calls ran at once"):format(elapsed))
  end)

  it("rabi.sleep in a handler waits about as long as asked", function()
    local t0 = H.now()
    local r = client:remote_call(N("sleep"), { 0.4 })
    local elapsed = H.now() - t0
    assert.is_true(r.slept >= 0.38, "slept only " .. r.slept)
    assert.is_true(r.slept < 2, "slept " .. r.slept)
    assert.is_true(elapsed >= 0.38)
  end)

  it("rabi.sleep on the client's main thread blocks about as long as asked", function()
    local t0 = H.now()
    rabi.sleep(0.3)
    local elapsed = H.now() - t0
    assert.is_true(elapsed >= 0.28 and elapsed < 2, ("rabi.sleep(0.3) took %.2f s"):format(elapsed))
  end)

  it("serves a function that calls another service (gateway style)", function()
    assert.equal(1 + 4 + 9 + 16, client:remote_call(N("sum_sq"), { { 1, 2, 3, 4 } }))
  end)

  it("skips a request whose caller gave up while it waited in the queue", function()
    -- counted serves one call at a time and counts the calls it ran.
    local first = rabi.spawn(function() return client:remote_call(N("counted"), { 1 }) end)
    rabi.sleep(0.2) -- the first call is running
    H.expect_error("timeout", client.remote_call, client, N("counted"), { 0 }, nil, nil, { timeout = 0.3 })
    local ok, n1 = rabi.wait(first)
    assert.is_true(ok, tostring(n1))
    local n3 = client:remote_call(N("counted"), { 0 })
    assert.equal(n1 + 1, n3, "the handler ran for the call that had timed out")
  end)

  it("runs on_start hooks once before serving", function()
    assert.equal(1, client:remote_call(N("started"), {}))
  end)

  it("rabi.log writes to the host's log at the host's level", function()
    local marker = H.random_hex(6)
    assert.is_true(client:remote_call(N("log_it"), { marker }))
    local log = H.wait_until(function()
      local l = host:log()
      return l:find("spec warn line: " .. marker, 1, true) and l
    end, 5)
    assert.is_string(log, "the warning never reached the log")
    assert.matches("INFO[^\n]*spec log line: " .. marker, log)
    assert.matches("WARN[^\n]*spec warn line: " .. marker, log)
    assert.not_matches("spec debug line: " .. marker, log, 1, true)
  end)

  it("keeps rabi.store per worker across calls", function()
    local before = client:remote_call(N("store_get"), { "typed_runs" })
    assert.equal("ok", client:remote_call(N("typed"), { 1, "s" }))
    assert.equal("ok", client:remote_call(N("typed"), { 2, "s" }))
    assert.equal(before + 2, client:remote_call(N("store_get"), { "typed_runs" }))
  end)
end)

describe("a service folder with broken scripts, served with --keep-going", function()
  local host, client
  local fx = H.host_fixture { dir = "spec/fixtures/broken", args = { "--keep-going" } }

  setup(function() host, client = fx:start() end)
  teardown(function() fx:stop() end)

  it("reports a syntax error with its file and line", function()
    assert.matches("spec/fixtures/broken/b_syntax.lua:5:", host:log(), 1, true)
  end)

  it("reports an error raised at load time with its file and line", function()
    assert.matches("spec/fixtures/broken/c_raises.lua:6:", host:log(), 1, true)
    assert.matches("missing setting, raised on line 6", host:log(), 1, true)
  end)

  it("still serves the scripts that loaded, before and after the broken ones", function()
    assert.equal(2, host.serving)
    assert.equal("a", client:remote_call(host:name("good_a"), {}))
    assert.equal("d", client:remote_call(host:name("good_d"), {}))
  end)

  it("serves nothing the broken scripts registered", function()
    H.expect_error("no_route", client.remote_call, client, host:name("never_c"), {})
  end)
end)

describe("a service script with an option the broker refuses", function()
  teardown(function() H.stop_all() end)

  -- register_call takes fetch_size = 70000, but basic.qos cannot: the
  -- script should be refused with its file and function named, and the
  -- other scripts served, as for any script that fails to load.
  it("is reported with its function's name, and the other scripts still serve", function()
    local host = H.start { dir = "spec/fixtures/badopts", args = { "--keep-going" }, wait = false }
    local state = H.wait_until(function()
      local log = host:log()
      if log:match("serving %d+ function") then return "serving" end
      if log:match("worker failed") or log:match("exited with status") then return "crashed" end
    end, 15)
    local log = host:log()
    assert.equal("serving", state, "the worker did not come up:\n" .. log)
    assert.matches("serving 1 function", log, 1, true)
    assert.matches("huge_fetch" .. host.suffix, log:match("[^\n]*fetch_size[^\n]*") or "", 1, true)
    local client = H.client()
    assert.equal("fine", client:remote_call(host:name("fine"), {}))
    client:close()
  end)
end)

describe("queue arguments that differ from the broker's", function()
  local suffix = H.new_suffix()
  teardown(function() H.stop_all() end)

  it("are refused for that function with a message naming it; the others serve", function()
    local a = H.start { dir = "spec/fixtures/conflict", suffix = suffix, env = { RABI_SPEC_QUEUE_SIZE = "5" },
      functions = 2 }
    local b = H.start { dir = "spec/fixtures/conflict", suffix = suffix, env = { RABI_SPEC_QUEUE_SIZE = "9" } }
    assert.equal(1, b.serving)
    local log = b:log()
    assert.matches("conf" .. suffix, log:match("[^\n]*PRECONDITION_FAILED[^\n]*") or "", 1, true)
    assert.matches("re_register", log, 1, true)
    local client = H.client()
    assert.equal(5, client:remote_call("conf" .. suffix, {}))
    assert.equal("other", client:remote_call("other" .. suffix, {}))
    client:close()
    assert.is_true(a:alive())
  end)

  it("with re_register = true, replace the queue with the new arguments", function()
    local c = H.start { dir = "spec/fixtures/conflict", suffix = suffix,
      env = { RABI_SPEC_QUEUE_SIZE = "9", RABI_SPEC_REREGISTER = "1" }, functions = 2 }
    local q = H.queues()["rpc_async_conf" .. suffix]
    assert.is_table(q)
    assert.equal(9, q.arguments["x-max-length"])
    local client = H.client()
    assert.equal(9, client:remote_call("conf" .. suffix, {}))
    client:close()
    assert.is_true(c:alive())
  end)

  it("with re_register = true, serve a queue that does not exist yet", function()
    local fresh = H.new_suffix()
    local d = H.start { dir = "spec/fixtures/conflict", suffix = fresh,
      env = { RABI_SPEC_QUEUE_SIZE = "3", RABI_SPEC_REREGISTER = "1" } }
    assert.equal(2, d.serving, d:log())
    local client = H.client()
    assert.equal(3, client:remote_call("conf" .. fresh, {}))
    client:close()
  end)
end)

describe("the supervisor", function()
  teardown(function() H.stop_all() end)
  it("with -w 2 serves each function from two workers side by side", function()
    local rabi = H.rabi()
    local host = H.start { dir = "spec/fixtures/basic", args = { "-w", "2" } }
    -- both workers serve (start returned at the first one's line)
    assert.equal(2, #host:worker_pids(2), "two workers did not both serve:\n" .. host:log())
    local client = H.client()
    -- fetch_size = 2 per worker: 8 one-second calls take about 2 s on two workers, 4 s on one.
    local results, elapsed = H.concurrently(8, function()
      return client:remote_call(host:name("sleep2"), { 1 })
    end)
    client:close()
    for i, r in ipairs(results) do assert.is_true(r.ok, "call " .. i .. ": " .. tostring(r.value)) end
    assert.is_true(elapsed > 1.5, ("took %.2f s: more than 4 calls ran at once"):format(elapsed))
    assert.is_true(elapsed < 3.6, ("took %.2f s: the second worker did not take its share"):format(elapsed))
    assert.equal(0, host:stop())
  end)

  it("exits after --drain-timeout even when a call is still running", function()
    local rabi = H.rabi()
    local host = H.start { dir = "spec/fixtures/basic", args = { "--drain-timeout=1" } }
    local client = H.client { timeout = 20 }
    local t = rabi.spawn(function() return client:try_remote_call(host:name("sleep"), { 30 }) end)
    rabi.sleep(0.3)
    local t0 = H.now()
    host:kill("TERM")
    -- The call's sleep is cancelled at the drain timeout, so its caller
    -- gets an answer.
    local ok, success, err_code, result = rabi.wait(t)
    local code = host:wait_exit(10)
    local elapsed = H.now() - t0
    client:close()
    assert.is_not_nil(code, "the host did not exit within 10 s of SIGTERM")
    assert.is_true(elapsed < 8, ("exited %.1f s after SIGTERM with --drain-timeout=1"):format(elapsed))
    assert.matches("drain timed out", host:log(), 1, true)
    assert.is_true(ok)
    assert.is_true(success, "the call got no reply: " .. tostring(result))
    assert.equal(1, err_code)
    assert.matches("the worker is stopping", tostring(result), 1, true)
  end)


  it("restarts a worker that dies, which then serves again", function()
    local host = H.start { dir = "spec/fixtures/broken", args = { "--keep-going" } }
    local old = tonumber(host:log():match("%[(%d+) w0%] serving"))
    assert.is_number(old)
    assert.is_true(H.signal_if(old, "rabihost", 9), "worker " .. old .. " is not running")
    local new = H.wait_until(function()
      for pid in host:log():gmatch("%[(%d+) w0%] serving") do
        if tonumber(pid) ~= old then return tonumber(pid) end
      end
    end, 15)
    assert.is_number(new, "no new worker started serving:\n" .. host:log())
    assert.matches("killed by signal 9", host:log(), 1, true)
    local client = H.client()
    assert.equal("d", client:remote_call(host:name("good_d"), {}))
    client:close()
    assert.equal(0, host:stop())
  end)
end)

describe("--reload", function()
  teardown(function() H.stop_all() end)

  local function count(text, pattern)
    local n = 0
    for _ in text:gmatch(pattern) do n = n + 1 end
    return n
  end

  it("serves the new code after a change, and keeps the old when the new fails to load", function()
    local dir = H.tmpname("reload")
    os.execute("mkdir -p " .. H.quote(dir))
    local script = [[
local rabi = require "rabibridge"
rabi.register_call("version" .. os.getenv("RABI_SPEC_SUFFIX"), {}, function() return %d end)
]]
    H.write_file(dir .. "/v.lua", script:format(1))
    local host = H.start { dir = dir, args = { "--reload" } }
    local client = H.client()
    local name = host:name("version")
    assert.equal(1, client:remote_call(name, {}))

    H.write_file(dir .. "/v.lua", script:format(2))
    assert.is_truthy(H.wait_until(function() return count(host:log(), "reloaded") >= 1 end, 15),
      "no reload:\n" .. host:log())
    assert.equal(2, client:remote_call(name, {}))

    H.write_file(dir .. "/broken.lua", "local x = = 1\n")
    assert.is_truthy(H.wait_until(function() return host:log():find("reload failed", 1, true) end, 15),
      "the broken script was not noticed:\n" .. host:log())
    assert.equal(2, client:remote_call(name, {}))
    assert.matches("broken.lua:1:", host:log(), 1, true)
    client:close()
    assert.equal(0, host:stop())
  end)
end)

describe("stopping", function()
  teardown(function() H.stop_all() end)

  it("on SIGTERM answers the call in flight, then exits 0", function()
    local rabi = H.rabi()
    local host = H.start { dir = "spec/fixtures/basic", args = { "--drain-timeout=10" } }
    local client = H.client()
    local t = rabi.spawn(function() return client:remote_call(host:name("sleep"), { 1.5 }) end)
    rabi.sleep(0.5) -- the request is published and taken meanwhile
    host:kill("TERM")
    local ok, r = rabi.wait(t)
    client:close()
    assert.is_true(ok, "the call in flight failed: " .. tostring(r))
    assert.equal(1.5, r.asked)
    assert.equal(0, host:wait_exit(15))
  end)

  it("after SIGTERM takes no new calls: its queue stays, with no consumer, for the next worker", function()
    local host = H.start { dir = "spec/fixtures/broken", args = { "--keep-going" } }
    local client = H.client({ timeout = 3 })
    assert.equal("a", client:remote_call(host:name("good_a"), {}))
    assert.equal(0, host:stop())
    local q = H.queues()["rpc_async_" .. host:name("good_a")]
    assert.is_table(q, "the queue went with its worker")
    assert.equal(0, q.consumers)
    -- Nobody takes the call: it expires in the queue and is answered so
    -- (by the expired-request consumer of any other host), or times out.
    local e = H.expect_error("timeout", client.remote_call, client, host:name("good_a"), {}, nil, nil, { timeout = 1 })
    assert.not_matches("^a$", tostring(e))
    client:close()
  end)
end)

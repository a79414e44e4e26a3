-- Losing no call (issue 11): queues that outlive their workers, requests
-- that expire answered, drains that finish within --drain-timeout, and a
-- client that never waits forever by default. Default settings unless a
-- test is about a setting; the suite's broker (these tests close
-- connections on it, but never stop it).
local H = require "helper"

local FIX = "spec/fixtures/durable"
local rabi

setup(function() rabi = H.rabi() end)

local function worker_pids(host)
  local out = {}
  for pid in host:log():gmatch("%[(%d+) w0%] serving %d+ function") do out[#out + 1] = tonumber(pid) end
  return out
end

local drive_until = H.drive_until

local function config_file(text)
  local path = H.tmpname("config") .. ".lua"
  H.write_file(path, text)
  return path
end

-- The broker's connection of the worker process pid.
local function connection_of(pid)
  local ports = H.broker_ports_of(pid)
  for _, conn in ipairs(H.connections()) do
    for _, port in ipairs(ports) do
      if conn.peer_port == port then return conn.pid end
    end
  end
end

-- A timeout that no host answered: the client's own timer ran out.
local function unanswered(err)
  return type(err) == "table" and err.kind == "timeout" and tostring(err.message):match("^no reply from") ~= nil
end

-- `n` tasks calling name again and again with the client's default
-- timeout; each outcome is counted under the phase current when its call
-- began. -> loops (loops.phase = "..." to start a phase; loops:finish())
local function call_loops(client, n, name)
  local loops = { running = true, phase = "start", order = {}, by_phase = {}, tasks = {} }
  local function count(phase, success, code, result)
    local p = loops.by_phase[phase]
    if not p then
      p = { calls = 0, answered = 0, failed = 0, unanswered = 0, kinds = {}, examples = {} }
      loops.by_phase[phase] = p
      loops.order[#loops.order + 1] = phase
    end
    p.calls = p.calls + 1
    if success and code == 0 then
      p.answered = p.answered + 1
      return
    end
    p.failed = p.failed + 1
    local kind = success and "remote" or (type(result) == "table" and result.kind or "?")
    p.kinds[kind] = (p.kinds[kind] or 0) + 1
    if unanswered(result) then p.unanswered = p.unanswered + 1 end
    if #p.examples < 3 then p.examples[#p.examples + 1] = tostring(result):match("^[^\n]*") end
  end
  for i = 1, n do
    loops.tasks[i] = rabi.spawn(function()
      while loops.running do
        local phase = loops.phase
        count(phase, client:try_remote_call(name, {}))
      end
    end)
  end
  function loops:finish()
    self.running = false
    for _, t in ipairs(self.tasks) do
      local ok, err = rabi.wait(t)
      assert(ok, "a call loop failed: " .. tostring(err))
    end
  end
  function loops:report()
    local lines = {}
    for _, phase in ipairs(self.order) do
      local p = self.by_phase[phase]
      local kinds = {}
      for k, v in pairs(p.kinds) do kinds[#kinds + 1] = ("%s %d"):format(k, v) end
      table.sort(kinds)
      lines[#lines + 1] = ("  %-22s %5d calls, %5d answered, %3d failed (%s), %d timed out unanswered%s"):format(
        phase .. ":", p.calls, p.answered, p.failed, #kinds > 0 and table.concat(kinds, ", ") or "none",
        p.unanswered, #p.examples > 0 and "\n      " .. table.concat(p.examples, "\n      ") or "")
    end
    return table.concat(lines, "\n")
  end
  return loops
end

describe("the only worker under 50 call loops", function()
  teardown(function() H.stop_all() end)

  it("through kill -9, a closed connection, and SIGTERM with a restart: every call answered", function()
    local host = H.start { dir = FIX, args = { "-w", "1" } }
    local client = rabi.client { url = host.broker.url }:connect() -- the default timeout
    local name = host:name("slow")
    local loops = call_loops(client, 50, name)
    rabi.sleep(1)

    loops.phase = "kill -9"
    local victim = worker_pids(host)[1]
    rabi.sleep(0.5)
    assert.is_true(H.signal_if(victim, "rabihost", 9), "cannot kill the worker")
    local restarted = drive_until(function() return worker_pids(host)[2] end, 15)
    assert.is_number(restarted, "the worker was not restarted:\n" .. host:log())
    rabi.sleep(1.5)

    loops.phase = "connection closed"
    local conn = drive_until(function() return connection_of(restarted) end, 5)
    assert.is_string(conn, "the worker's connection is not on the broker")
    rabi.sleep(0.5)
    H.close_connection(conn)
    assert.is_truthy(drive_until(function() return host:log():find("reconnected; serving again", 1, true) end, 15),
      "the worker did not reconnect:\n" .. host:log())
    rabi.sleep(1.5)

    loops.phase = "SIGTERM and restart"
    rabi.sleep(0.5)
    local t0 = H.now()
    host:kill("TERM")
    assert.is_truthy(drive_until(function() return host:exited() end, 15), "the host did not exit")
    local drained_in = H.now() - t0
    assert.equal(0, host:wait_exit(1))
    local next_host = H.start { dir = FIX, suffix = host.suffix, args = { "-w", "1" } }
    rabi.sleep(2)

    loops.phase = "after"
    rabi.sleep(0.5)
    loops:finish()
    client:close()
    next_host:stop()
    print(("\n[durable_spec] 50 call loops on the only worker (slow: 0.2 s, fetch_size 8); drained in %.2f s\n%s")
      :format(drained_in, loops:report()))
    for _, phase in ipairs { "kill -9", "connection closed", "SIGTERM and restart" } do
      local p = loops.by_phase[phase]
      assert.is_table(p, "no call began during " .. phase)
      assert.is_true(p.calls > 0)
      assert.equal(0, p.unanswered, phase .. ": calls timed out unanswered\n" .. loops:report())
      assert.equal(0, p.failed, phase .. ": calls failed\n" .. loops:report())
    end
    -- With durable queues the drain only waits for the 8 calls in flight.
    assert.is_true(drained_in < 4, ("the drain took %.1f s"):format(drained_in))
    assert.not_matches("drain timed out", host:log())
  end)
end)

describe("a function nobody serves any more", function()
  teardown(function() H.stop_all() end)

  it("is answered with kind timeout while its queue lives, then is no_route once the queue expires", function()
    -- The call below must expire (at 3.6 s) before its queue does: a queue
    -- that goes takes what waits in it along, unanswered.
    local a = H.start { dir = FIX, args = { "-c", config_file "app = { queue_expires = 6 }\n" } }
    local other = H.start { dir = "spec/fixtures/basic" } -- it answers expired requests too
    local client = H.client { timeout = 4 }
    assert.equal("x", client:remote_call(a:name("echo"), { "x" }))
    assert.equal(0, a:stop())
    local gone_at = H.now()

    local t0 = H.now()
    local e = H.expect_error("timeout", client.remote_call, client, a:name("echo"), { "y" })
    local waited = H.now() - t0
    assert.matches("no worker took the request from queue 'rpc_async_" .. a:name("echo") .. "'", e.message, 1, true)
    assert.matches("before its caller's deadline", e.message, 1, true)
    assert.is_true(waited < 4, ("answered after %.1f s, the caller's whole timeout"):format(waited))

    local no_route = drive_until(function()
      local err = H.catch(client.remote_call, client, a:name("echo"), { "z" }, nil, nil, { timeout = 1 })
      return err and err.kind == "no_route" and err
    end, 30)
    local after = H.now() - gone_at
    client:close()
    other:stop()
    print(("\n[durable_spec] a function whose only host stopped: no_route %.1f s later (app.queue_expires = 6)")
      :format(after))
    assert.is_table(no_route, "still no no_route 30 s after its host stopped")
    assert.matches("no function is served", no_route.message, 1, true)
  end)

  it("its queue gets x-expires from app.queue_expires, and none with RabiBridge's auto-delete queues", function()
    local a = H.start { dir = FIX, args = { "-c", config_file "app = { queue_expires = 3 }\n" } }
    local b = H.start { dir = FIX, args = { "-c", config_file "app = { queue_auto_delete = true }\n" } }
    local queues = H.queues()
    a:stop()
    b:stop()
    local qa, qb = queues["rpc_async_" .. a:name("echo")], queues["rpc_async_" .. b:name("echo")]
    assert.equal(3000, qa.arguments["x-expires"])
    assert.is_false(qa.auto_delete)
    -- exactly what a Python RabiBridge server declares, so that it can share the queue
    assert.same({ ["x-overflow"] = "reject-publish" }, qb.arguments)
    assert.is_true(qb.auto_delete)
    assert.is_true(qb.durable)
  end)
end)

describe("expired requests", function()
  local host, client
  local fx = H.host_fixture { dir = FIX, args = { "--access-log" }, client = { timeout = 10 } }
  setup(function() host, client = fx:start() end)
  teardown(function() fx:stop() end)

  it("a request that outlives its queue's timeout is answered with kind timeout naming the queue", function()
    local name = host:name("ttl")
    local first = rabi.spawn(function() return client:remote_call(name, { 3 }) end)
    rabi.sleep(0.2) -- the first holds the only slot (fetch_size 1)
    local t0 = H.now()
    local e = H.expect_error("timeout", client.remote_call, client, name, { 0 })
    local waited = H.now() - t0
    assert.matches("no worker took the request from queue 'rpc_async_" .. name .. "' within its timeout", e.message,
      1, true)
    assert.matches("x-message-ttl 1000 ms", e.message, 1, true)
    assert.is_true(waited < 5, ("answered after %.1f s: the caller waited out its own 10 s?"):format(waited))
    local ok, v = rabi.wait(first)
    assert.is_true(ok, tostring(v))
    assert.equal("ran", v)
    assert.matches("answering cid %d+ with a timeout", host:log())
    -- the access log has it too, under the caller's trace, as not run
    local cid, trace = host:log():match("answering cid (%d+) with a timeout[^\n]*trace_id=(%x+)")
    assert.is_string(trace, host:log())
    local line = H.wait_until(function()
      return host:log():match("[^\n]* access [^\n]*cid=" .. cid .. "[^\n]*")
    end, 5)
    assert.is_string(line, host:log())
    assert.matches("function=rabihost.expired outcome=expired", line, 1, true)
    assert.matches("trace_id=" .. trace, line, 1, true)
  end)
end)

describe("draining", function()
  teardown(function() H.stop_all() end)

  it("SIGTERM cancels the consumers at once; a call queued meanwhile is served by the next host", function()
    local host = H.start { dir = FIX, args = { "--drain-timeout=10" } }
    local client = H.client { timeout = 20 }
    local hold, echo = host:name("hold"), host:name("echo")
    -- The call in flight holds the worker 6 s: longer than rabbitmqctl can
    -- take to show the consumers gone on a busy machine, so that the host
    -- is still draining when they are (it exited first once, with 2 s).
    local inflight = rabi.spawn(function() return client:remote_call(hold, { "in-flight", 6 }) end)
    assert.is_truthy(drive_until(function() return host:log():find("spec hold in-flight taken", 1, true) end, 5))
    host:kill("TERM")
    local t_term = H.now()
    local cancelled = drive_until(function()
      local q = H.queues()["rpc_async_" .. echo]
      return q and q.consumers == 0
    end, 3)
    assert.is_true(H.now() - t_term < 5, "the consumers were seen gone only after the call in flight ended")
    assert.is_truthy(cancelled, "the draining worker still consumes")
    assert.is_false(host:exited(), "the host did not wait for its call in flight")
    local queued = rabi.spawn(function() return client:remote_call(echo, { "queued" }) end)
    local ok, v = rabi.wait(inflight)
    assert.is_true(ok, tostring(v))
    assert.equal("in-flight", v)
    assert.equal(0, host:wait_exit(10))
    local next_host = H.start { dir = FIX, suffix = host.suffix }
    ok, v = rabi.wait(queued)
    client:close()
    next_host:stop()
    assert.is_true(ok, tostring(v))
    assert.equal("queued", v)
  end)

  it("--drain-timeout is a hard limit, even for a handler that never yields", function()
    local host = H.start { dir = FIX, args = { "--drain-timeout=3" } }
    local client = H.client { timeout = 2 }
    local spin = rabi.spawn(function() return client:try_remote_call(host:name("spin"), {}) end)
    assert.is_truthy(drive_until(function() return host:log():find("spec spin taken", 1, true) end, 5))
    local t0 = H.now()
    host:kill("TERM")
    local exited = drive_until(function() return host:exited() end, 15)
    local took = H.now() - t0
    rabi.wait(spin)
    client:close()
    assert.is_truthy(exited, "the host did not exit")
    -- 3 s, and a margin for a busy machine; it was --drain-timeout + 5 s.
    assert.is_true(took < 5.5, ("exited %.1f s after SIGTERM with --drain-timeout=3"):format(took))
    assert.matches("worker 0 %(pid %d+, generation 1%) killed by signal 9", host:log())
  end)

  it("a second SIGTERM stops at once; the call in flight goes back to its queue for the next host", function()
    local host = H.start { dir = FIX, args = { "--drain-timeout=30" } }
    local client = H.client { timeout = 30 }
    local t = rabi.spawn(function() return client:remote_call(host:name("hold"), { "again", 5 }) end)
    assert.is_truthy(drive_until(function() return host:log():find("spec hold again taken", 1, true) end, 5))
    local t0 = H.now()
    host:kill("TERM")
    rabi.sleep(0.5)
    host:kill("INT")
    local exited = drive_until(function() return host:exited() end, 15)
    local took = H.now() - t0
    assert.is_truthy(exited, "the host did not exit")
    assert.is_true(took < 3, ("exited %.1f s after the first signal"):format(took))
    assert.matches("second stop signal", host:log(), 1, true)
    local next_host = H.start { dir = FIX, suffix = host.suffix }
    local ok, v = rabi.wait(t)
    client:close()
    next_host:stop()
    assert.is_true(ok, tostring(v))
    assert.equal("again", v)
    assert.matches("spec hold again taken", next_host:log(), 1, true)
  end)
end)

describe("a client's timeout", function()
  local host, client
  local fx = H.host_fixture { dir = FIX, client = false }
  setup(function()
    host = fx:start()
    client = rabi.client { url = host.broker.url }:connect() -- the default timeout
  end)
  teardown(function()
    client:close()
    fx:stop()
  end)

  it("is 30 s by default, and app.call_timeout sets it", function()
    assert.equal(30, client.timeout)
    local c = rabi.client { url = host.broker.url, config = config_file "app = { call_timeout = 7 }\n" }
    assert.equal(7, c.timeout)
  end)

  it("0 and math.huge mean no limit", function()
    for _, t in ipairs { 0, math.huge } do
      local success, code, result = client:try_remote_call(host:name("hold"), { "long", 1.2 }, nil, nil, { timeout = t })
      assert.is_true(success, tostring(result))
      assert.equal(0, code)
      assert.equal("long", result)
    end
  end)

  it("NaN and a negative number are invalid_argument error values, never raised by try_remote_call", function()
    for _, t in ipairs { 0 / 0, -1, "5" } do
      local ok, success, code, result = pcall(client.try_remote_call, client, host:name("echo"), { 1 }, nil, nil,
        { timeout = t })
      assert.is_true(ok, "try_remote_call raised: " .. tostring(success))
      assert.is_false(success)
      assert.equal(1, code)
      assert.equal("invalid_argument", result.kind)
      assert.matches("timeout must be", result.message, 1, true)
    end
    local nan_client = H.client { timeout = 0 / 0 }
    local success, _, result = nan_client:try_remote_call(host:name("echo"), { 1 })
    nan_client:close()
    assert.is_false(success)
    assert.equal("invalid_argument", result.kind)
  end)

  it("a timeout beyond the broker's expiration limit (49 days) is cut to it, not refused", function()
    local success, code, result = client:try_remote_call(host:name("echo"), { "far" }, nil, nil, { timeout = 1e300 })
    assert.is_true(success, tostring(result))
    assert.equal(0, code)
    assert.equal("far", result)
    assert.equal("ok", client:remote_call(host:name("echo"), { "ok" }))
  end)
end)

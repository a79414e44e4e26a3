-- Surviving faults (issue 5): a broker that drops every connection or
-- restarts under a call loop, calls in flight or made while it is down,
-- workers killed before they ack, and hostile bytes on the wire.
--
-- These specs stop and restart a broker, so they run their OWN private
-- brokers (H.Broker.new: build/faults-broker, and build/faults-broker-b
-- for several --url; free ports), never the suite's: other spec files go
-- on undisturbed. Hosts and clients get it with broker = broker. A restart
-- is stop + start on the same port; each start begins with empty mnesia,
-- as a fresh broker does, and the workers declare their queues again. Raw
-- AMQP and zstd bodies come from spec/tools/faults_raw.py.
local H = require "helper"
local cjson = require "cjson"

-- ---- the private brokers ----

-- broker: the one most specs use; broker_b: a second one that takes over
-- when the first is down (several --url). Both start in the first setup.
local broker = H.Broker.new { dir = "build/faults-broker" }
local broker_b = H.Broker.new { dir = "build/faults-broker-b" }

-- ---- raw AMQP (spec/tools/faults_raw.py) ----

local function hex(s) return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end)) end
local function unhex(s) return (s:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end)) end

-- cases: { { routing_key =, body =, exchange = "rpc", reply_to = true|false,
-- correlation_id = "1" | false (none) } } -> results (with .body), uncorrelated bodies
local function raw_publish(cases, wait)
  local list = {}
  for i, c in ipairs(cases) do
    local cid = c.correlation_id
    if cid == nil then cid = tostring(5000 + i) end
    list[i] = {
      exchange = c.exchange or "rpc", routing_key = c.routing_key, body_hex = hex(c.body),
      reply_to = c.reply_to ~= false, correlation_id = cid or cjson.null,
    }
  end
  local res = H.run({ H.python, "spec/tools/faults_raw.py", "publish", broker.url, tostring(wait or 5) },
    { stdin = cjson.encode(list) })
  if res.code ~= 0 then error("faults_raw.py publish failed: " .. res.stderr, 2) end
  local out = cjson.decode(res.stdout)
  for _, r in ipairs(out.results) do
    r.body = r.body_hex ~= cjson.null and unhex(r.body_hex) or nil
  end
  local uncorrelated = {}
  for i, b in ipairs(out.uncorrelated) do uncorrelated[i] = unhex(b) end
  return out.results, uncorrelated
end

local bodies_cache
local function zstd_bodies()
  if not bodies_cache then
    local res = H.run { H.python, "spec/tools/faults_raw.py", "bodies" }
    assert(res.code == 0, res.stderr)
    local b = cjson.decode(res.stdout)
    bodies_cache = { bomb = unhex(b.bomb_hex), bomb_plain_len = b.bomb_plain_len, truncated = unhex(b.truncated_hex) }
  end
  return bodies_cache
end

-- ---- hosts and calls ----

local function log_count(host, pattern)
  local n = 0
  for _ in host:log():gmatch(pattern) do n = n + 1 end
  return n
end

local function worker_pids(host)
  local pids = {}
  for pid in host:log():gmatch("%[(%d+) w%d+%] serving %d") do pids[#pids + 1] = tonumber(pid) end
  return pids
end


-- Calls fn until it answers (no_route and timeouts while the workers come
-- back are expected). -> the result, or nil and the last error
local function call_until_answered(client, name, args, within)
  local deadline = H.now() + (within or 20)
  local err
  repeat
    local success, code, result = client:try_remote_call(name, args or {}, nil, nil, { timeout = 2 })
    if success and code == 0 then return result end
    err = result
    H.rabi().sleep(0.1)
  until H.now() > deadline
  return nil, err
end

-- Calls echo every ~20 ms until until() says stop.
-- -> { calls =, failures = { {kind =, message =, at =} }, first_ok_after = fn(t) }
local function call_loop(client, name, until_fn, max_seconds)
  local rabi = H.rabi()
  local t0 = H.now()
  local stats = { calls = 0, failures = {}, oks = {} }
  function stats.first_ok_after(t)
    for _, at in ipairs(stats.oks) do
      if at >= t then return at end
    end
  end
  function stats.describe()
    local lines = {}
    for i, f in ipairs(stats.failures) do
      if i > 12 then
        lines[#lines + 1] = ("... and %d more"):format(#stats.failures - 12)
        break
      end
      lines[#lines + 1] = ("  %.2f s: %s: %s"):format(f.at, f.kind, f.message)
    end
    return ("%d calls, %d failed:\n%s"):format(stats.calls, #stats.failures, table.concat(lines, "\n"))
  end
  local n = 0
  while not until_fn(stats) and H.now() - t0 < max_seconds do
    n = n + 1
    local success, code, result = client:try_remote_call(name, { n }, nil, nil, { timeout = 2 })
    stats.calls = stats.calls + 1
    if success and code == 0 and result == n then
      stats.oks[#stats.oks + 1] = H.now()
    else
      local e = result
      stats.failures[#stats.failures + 1] = {
        kind = type(e) == "table" and e.kind or ("wrong answer " .. tostring(e)),
        message = type(e) == "table" and e.message or tostring(e), at = H.now() - t0,
      }
    end
    rabi.sleep(0.02)
  end
  return stats
end

local function assert_kinds(stats, allowed)
  for _, f in ipairs(stats.failures) do
    assert.is_true(allowed[f.kind] == true, ("a call failed with kind %s: %s\n%s"):format(f.kind, f.message,
      stats.describe()))
  end
end

-- ---------------------------------------------------------------------

describe("faults (private broker)", function()
  local rabi, host, client
  local function N(base) return host:name(base) end
  local fx = H.host_fixture { dir = "spec/fixtures/faults", broker = broker, client = { timeout = 10 } }

  local broker_b_started -- the second broker boots meanwhile

  setup(function()
    rabi = H.rabi()
    broker_b_started = broker_b:start_in_background()
    broker:start()
    host, client = fx:start()
  end)

  teardown(function()
    -- A background broker job a failed test left running ends first.
    H.wait_background(40)
    pcall(fx.stop, fx) -- a client whose broker went away may not close cleanly
    broker:stop()
    broker_b:stop()
  end)

  -- The host answers (after a previous test's outage). -> its worker's pid
  local function ready()
    local who, err = call_until_answered(client, N("whoami"), {}, 25)
    assert(who, "the host does not answer before the test: " .. tostring(err) .. "\n" .. host:log())
    return who
  end

  describe("connections the broker closes", function()
    it("under a call loop: the same host and client answer on, with few failures of kind connection or no_route",
      function()
        local worker_before = ready()
        local closed = H.background(broker.ctl_prefix .. " -q close_all_connections 'closed by faults_spec'")
        local closed_at
        local stats = call_loop(client, N("echo"), function()
          if not closed_at and closed() then closed_at = H.now() end
          return closed_at and H.now() - closed_at > 2
        end, 20)
        assert.is_truthy(closed_at, "close_all_connections did not finish")
        assert.is_true(stats.calls >= 50, stats.describe())
        -- The broker did close them: the worker says so.
        assert.matches("broker connection lost", host:log(), 1, true)
        assert.is_true(#stats.failures < stats.calls * 0.1, stats.describe())
        assert_kinds(stats, { connection = true, not_accepted = true, no_route = true })
        -- The same client object and the same worker process answer on.
        assert.equal("after", client:remote_call(N("echo"), { "after" }))
        assert.equal(worker_before, client:remote_call(N("whoami"), {}))
        assert.is_true(host:alive())
        assert.not_matches("restarting in", host:log())
      end)
  end)

  describe("a publish the broker never confirmed", function()
    it("fails with kind not_accepted when the connection drops before the confirm", function()
      ready()
      -- A memory alarm blocks publishing connections: the broker reads
      -- nothing more from them, so the request is never confirmed.
      local name = "spec unconfirmed " .. H.random_hex(4)
      local c = H.client { broker = broker, connection_name = name, timeout = 10 }
      finally(function()
        broker:ctl("set_vm_memory_high_watermark 0.4")
        pcall(c.close, c)
      end)
      assert.equal("before", c:remote_call(N("echo"), { "before" }))
      broker:ctl("set_vm_memory_high_watermark 0")
      local t = rabi.spawn(function() return c:try_remote_call(N("echo"), { "unconfirmed" }) end)
      rabi.sleep(0.5)
      local conn
      for _, k in ipairs(broker:connections()) do
        if k.name == name then conn = k end
      end
      assert.is_table(conn, "the client's connection is not on the broker")
      broker:close_connection(conn.pid, "closed by faults_spec")
      local ok, success, code, err = rabi.wait(t)
      assert.is_true(ok, tostring(success))
      assert.is_false(success, "a call the broker never confirmed succeeded: " .. tostring(code))
      assert.equal("not_accepted", err.kind, tostring(err))
      assert.matches("before the broker confirmed the request to 'async_" .. N("echo") .. "': it was not accepted",
        err.message, 1, true)
      -- A call the broker had accepted (the worker took it) stays kind
      -- connection when its connection drops: "a call in flight" below.
    end)
  end)

  describe("a broker restart", function()
    -- A client in another process that stays idle across the restart.
    local idle = {}

    setup(function()
      local base = H.tmpname("idle-client")
      idle.ready, idle.go, idle.out = base .. ".ready", base .. ".go", base .. ".out"
      os.execute(("( %s run spec/fixtures/faults-scripts/idle_client.lua %s %s %s %s %s >%s 2>&1 & ) </dev/null")
        :format(H.rabihost, H.quote(broker.url), H.quote(N("echo")), H.quote(idle.ready), H.quote(idle.go),
          H.quote(idle.out), H.quote(base .. ".log")))
      idle.log = base .. ".log"
      idle.started = H.wait_until(function() return H.read_file(idle.ready) end, 10)
    end)

    teardown(function()
      if idle.go then H.write_file(idle.go, "go\n") end -- lets it end
    end)

    it("under a call loop: the same host pid and the same client answer again within 15 s of the broker being back",
      function()
        local worker_before = ready()
        local stopped, started, job_log = broker:restart_in_background(0.5)
        local stopped_at, started_at
        local stats = call_loop(client, N("echo"), function(s)
          if not stopped_at and stopped() then stopped_at = H.now() end
          if not started_at and started() then started_at = H.now() end
          return started_at and (s.first_ok_after(started_at) or H.now() - started_at > 20)
        end, 60)
        assert.is_truthy(stopped_at, "the broker did not stop")
        assert.is_truthy(started_at, "the broker did not come back")
        assert.matches("up on 127.0.0.1:" .. broker.port, H.read_file(job_log) or "", 1, true)
        -- The outage did show.
        assert.is_true(#stats.failures >= 1, stats.describe())
        assert_kinds(stats, { connection = true, not_accepted = true, no_route = true, timeout = true })
        local back = stats.first_ok_after(started_at)
        assert.is_truthy(back, "no call answered within 20 s of the broker being back: " .. stats.describe()
          .. "\n" .. host:log())
        assert.is_true(back - started_at < 15, ("answered only %.1f s after the broker was back"):format(back - started_at))
        -- The same processes: no restart of the worker, the supervisor alive.
        assert.equal(worker_before, client:remote_call(N("whoami"), {}))
        assert.is_true(host:alive())
        assert.matches("reconnected; serving again", host:log(), 1, true)
        assert.not_matches("restarting in", host:log())
      end)

    it("a client idle across the restart: its first call afterwards succeeds", function()
      -- The restart is the previous test's; the idle client did not call,
      -- nor read its socket, meanwhile.
      assert.equal("before\n", idle.started, "the idle client did not start: " .. (H.read_file(idle.log) or ""))
      ready()
      H.write_file(idle.go, "go\n")
      local out = H.wait_until(function() return H.read_file(idle.out) end, 25)
      assert.is_string(out, "the idle client did not answer: " .. (H.read_file(idle.log) or ""))
      local success, what, message, elapsed = out:match("^(%a+)\t([^\t]*)\t([^\t]*)\t([%d.]+)")
      assert.equal("true", success, ("its call failed after %s s with %s: %s"):format(tostring(elapsed),
        tostring(what), tostring(message)))
      assert.equal("after", what)
    end)
  end)

  describe("a call in flight when the broker goes down", function()
    it("fails promptly with kind connection, well before its 10 s timeout", function()
      ready()
      local t = rabi.spawn(function()
        local t0 = H.now()
        local success, code, err = client:try_remote_call(N("hold"), { "inflight", 5 }, nil, nil, { timeout = 10 })
        return { success = success, code = code, err = err, elapsed = H.now() - t0 }
      end)
      assert.is_truthy(H.wait_until(function()
        rabi.sleep(0.05)
        return host:log():find("hold inflight taken", 1, true)
      end, 5), "the worker never took the call")
      local t_stop = H.now()
      local stopped = H.background(broker:script("stop"))
      local ok, r = rabi.wait(t)
      local failed_after = H.now() - t_stop
      H.wait_until(stopped, 30)
      broker:start()
      assert.is_true(ok, tostring(r))
      assert.is_false(r.success, "the call in flight succeeded over a broker that went down")
      assert.equal("connection", r.err.kind, tostring(r.err))
      assert.is_true(failed_after < 5, ("it failed %.1f s after the stop began"):format(failed_after))
      assert.is_true(r.elapsed < 8, ("it failed only after %.1f s"):format(r.elapsed))
    end)
  end)

  describe("calls made while the broker is down", function()
    -- The gated client logs in as a user that only exists once the test
    -- adds it: it cannot come back before the workers have declared their
    -- queues again on the fresh broker, so its call cannot meet a no_route.
    local gated, idle, other
    local gated_url

    setup(function()
      ready()
      broker:ctl("add_user faults_gated faults_gated")
      broker:ctl("set_permissions -p / faults_gated '.*' '.*' '.*'")
      gated_url = broker.url:gsub("guest:guest@", "faults_gated:faults_gated@")
      gated = H.client { url = gated_url, timeout = 30 }
      idle = H.client { broker = broker, timeout = 10 }
      other = H.client { broker = broker, timeout = 10 }
      for _, c in ipairs { gated, idle, other } do assert.equal("hi", c:remote_call(N("echo"), { "hi" })) end
      -- Down, and nothing has driven the clients' loop since.
      broker:stop()
    end)

    teardown(function()
      H.wait_background(40)
      if not broker:running() then broker:start() end
      for _, c in ipairs { gated, idle, other } do pcall(c.close, c) end
    end)

    it("a client idle when the broker went down: its first call waits for the broker within its timeout", function()
      -- Issue 5: "calls made while disconnected wait for the reconnection
      -- within their own timeout". This client has not noticed yet.
      local t0 = H.now()
      local success, _, err = idle:try_remote_call(N("echo"), { "idle" }, nil, nil, { timeout = 1.5 })
      local elapsed = H.now() - t0
      assert.is_false(success)
      assert.equal("timeout", err.kind, ("failed after %.2f s with %s"):format(elapsed, tostring(err)))
      assert.is_true(elapsed >= 1.3, ("failed after %.2f s"):format(elapsed))
    end)

    it("a call whose timeout expires before the broker is back fails with kind timeout", function()
      rabi.sleep(0.3) -- the clients notice the loss
      local t0 = H.now()
      local success, _, err = other:try_remote_call(N("echo"), { "short" }, nil, nil, { timeout = 1 })
      local elapsed = H.now() - t0
      assert.is_false(success)
      assert.equal("timeout", err.kind, tostring(err))
      assert.is_true(elapsed >= 0.9 and elapsed < 3, ("failed after %.2f s"):format(elapsed))
    end)

    it("a call waits and succeeds once the broker (and the service) is back within its timeout", function()
      local started = broker:start_in_background()
      local serving_before = log_count(host, "serving again")
      -- Let the gated client in once the worker serves again.
      local gate_open = false
      local gate = rabi.spawn(function()
        local deadline = H.now() + 40
        while H.now() < deadline do
          if started() and log_count(host, "serving again") > serving_before then
            broker:ctl("add_user faults_gated faults_gated")
            broker:ctl("set_permissions -p / faults_gated '.*' '.*' '.*'")
            gate_open = true
            return true
          end
          rabi.sleep(0.2)
        end
        return false
      end)
      local t0 = H.now()
      local success, code, result = gated:try_remote_call(N("echo"), { "waited" }, nil, nil, { timeout = 30 })
      local elapsed = H.now() - t0
      rabi.wait(gate)
      assert.is_true(started(), "the broker did not come back")
      assert.is_true(gate_open, "the worker did not serve again:\n" .. host:log())
      assert.is_true(success, ("failed after %.1f s: %s"):format(elapsed, tostring(result)))
      assert.equal(0, code)
      assert.equal("waited", result)
      -- It did wait for the broker: more than the few seconds a start takes.
      assert.is_true(elapsed > 3, ("answered after %.1f s"):format(elapsed))
    end)
  end)

  describe("at-least-once", function()
    -- A worker killed with SIGKILL while its handler sleeps, before it acks:
    -- the broker requeues the request and a worker answers it.

    local function killed_before_ack(workers, args)
      local argv = { "-w", tostring(workers) }
      for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
      local h = H.start { dir = "spec/fixtures/faults", broker = broker, args = argv }
      finally(function() h:stop() end)
      assert.is_truthy(H.wait_until(function() return #worker_pids(h) >= workers end, 10))
      local c = H.client { broker = broker, timeout = 12 }
      local tag = "k" .. H.random_hex(3)
      local t = rabi.spawn(function() return c:try_remote_call(h:name("hold"), { tag, 2 }) end)
      local victim = H.wait_until(function()
        rabi.sleep(0.05)
        return tonumber(h:log():match("hold " .. tag .. " taken by pid (%d+)"))
      end, 5)
      assert.is_truthy(victim, "no worker took the request:\n" .. h:log())
      assert.is_true(victim ~= h:pid(), "that is the supervisor")
      assert.is_true(H.signal_if(victim, "rabihost", 9), "cannot kill the worker")
      local ok, success, code, result = rabi.wait(t)
      c:close()
      return h, victim, ok, success, code, result
    end

    it("a request taken by a worker killed before its ack is delivered again and answered (-w 2)", function()
      local h, victim, ok, success, code, result = killed_before_ack(2)
      assert.is_true(ok)
      assert.is_true(success, "the request was lost: " .. tostring(result) .. "\n" .. h:log())
      assert.equal(0, code)
      assert.is_table(result)
      assert.not_equal(victim, result.pid)
      assert.is_true(h:alive(), "the supervisor died")
    end)

    -- The queues are durable by default: when the only consumer dies, the
    -- queue, and the request in it, wait for the restarted worker. (With
    -- RabiBridge's auto-delete queues the broker would delete both.)
    it("a request taken by the only worker, killed before its ack, is answered by its restarted successor "
      .. "(-w 1)", function()
        local h, victim, ok, success, code, result = killed_before_ack(1)
        assert.is_true(ok)
        assert.is_true(success, "the request was lost: " .. tostring(result) .. "\n" .. h:log())
        assert.equal(0, code)
        assert.is_table(result)
        assert.not_equal(victim, result.pid)
      end)

    it("the request in the handler and those waiting in the queue when the only worker's connection drops "
      .. "are all answered", function()
      -- hold1 takes one request at a time: the others wait in the queue.
      -- The broker closes only the worker's connection; the client's lives.
      -- (Issue 5: a request whose worker lost its connection is delivered
      -- again and answered.)
      local h = H.start { dir = "spec/fixtures/faults", broker = broker }
      finally(function() h:stop() end)
      local worker = worker_pids(h)[1]
      local c = H.client { broker = broker, timeout = 40 }
      finally(function() c:close() end)
      local ports = broker:ports_of(worker)
      assert.equal(1, #ports, "the worker's broker connection was not found")
      local conn_pid
      for _, conn in ipairs(broker:connections()) do
        if conn.peer_port == ports[1] then conn_pid = conn.pid end
      end
      assert.is_string(conn_pid, "the worker's connection is not on the broker")
      local tasks = {}
      for i = 1, 3 do
        -- 5 s each: longer than rabbitmqctl can take to close the
        -- connection on a busy machine (3.4 s once, when q1 held 2 s and q2
        -- was taken before the close); 40 s covers all three after it.
        tasks[i] = rabi.spawn(function() return c:try_remote_call(h:name("hold1"), { "q" .. i, 5 }) end)
      end
      assert.is_truthy(H.wait_until(function()
        rabi.sleep(0.05)
        return h:log():find("hold1 q1 taken", 1, true)
      end, 5), "the worker never took the first request")
      broker:close_connection(conn_pid, "closed by faults_spec")
      -- q1 was in its handler, q2 and q3 waiting in the queue.
      assert.not_matches("hold1 q2 taken", h:log())
      local outcomes = {}
      for i, t in ipairs(tasks) do
        local ok, success, code, result = rabi.wait(t)
        outcomes[i] = ok and success and code == 0 and type(result) == "table" and result.tag
          or tostring(type(result) == "table" and result.kind or result)
      end
      assert.same({ "q1", "q2", "q3" }, outcomes)
      assert.equal(worker, tonumber(h:log():match("%[(%d+) w0%] reconnected")), "not the same worker")
    end)
  end)

  describe("hostile input", function()
    -- Two more hosts on the faults broker: one with max_body = 1000, one
    -- serving msgpack. Each case is published raw to a service's routing key.
    local small, mp, results, mp_results, uncorrelated
    local cases, mp_cases = {}, {}

    local function case(list, label, body, extra)
      local c = { label = label, body = body }
      for k, v in pairs(extra or {}) do c[k] = v end
      list[#list + 1] = c
      return #list
    end

    local OVER, BOMB, TRUNCATED, NO_CID, GOOD
    local MP_C1, MP_TRUNC, MP_STR32, MP_ARR32, MP_EXT, MP_SHAPE, MP_KEY, MP_GOOD

    setup(function()
      small = H.start { dir = "spec/fixtures/faults", broker = broker,
                        args = { "-c", "spec/fixtures/faults-config/small_body.lua" } }
      mp = H.start { dir = "spec/fixtures/faults", broker = broker,
                     args = { "-c", "spec/fixtures/faults-config/msgpack.lua" } }
      local z = zstd_bodies()
      OVER = case(cases, "a body over max_body", '[["' .. ("x"):rep(5000) .. '"], {}]')
      BOMB = case(cases, ("a %d-byte zstd frame that decompresses to %d bytes"):format(#z.bomb, z.bomb_plain_len), z.bomb)
      TRUNCATED = case(cases, "a truncated zstd frame", z.truncated)
      NO_CID = case(cases, "a request without correlation_id", '[["nocid"], {}]', { correlation_id = false })
      GOOD = case(cases, "a good request after the bad ones", '[["fine"], {}]')
      for _, c in ipairs(cases) do c.routing_key = "async_" .. small:name("echo") end

      MP_C1 = case(mp_cases, "msgpack byte 0xc1", "\193")
      MP_TRUNC = case(mp_cases, "truncated msgpack", "\146\145")
      MP_STR32 = case(mp_cases, "a msgpack str32 claiming 4 GB", "\146\145\219\255\255\255\255abc\128")
      MP_ARR32 = case(mp_cases, "a msgpack array32 claiming 4 G elements", "\146\221\255\255\255\255\128")
      MP_EXT = case(mp_cases, "a msgpack ext type", "\146\145\212\001\001\128")
      MP_SHAPE = case(mp_cases, "a msgpack integer instead of [args, kwargs]", "\001")
      MP_KEY = case(mp_cases, "a msgpack map with an array key", "\146\144\129\144\001")
      MP_GOOD = case(mp_cases, "a good msgpack request after the bad ones", "\146\145\164fine\128")
      for _, c in ipairs(mp_cases) do c.routing_key = "async_" .. mp:name("echo") end

      results, uncorrelated = raw_publish(cases, 3)
      mp_results = raw_publish(mp_cases, 3)
    end)

    local function decode_json(s) return cjson.decode(s) end
    local function decode_msgpack(s)
      local v, err = require("rabibridge.core").msgpack_decode(s)
      if v == nil then error(err) end
      return v
    end

    -- -> err_code, message of the reply to case i (asserting there is one)
    local function reply(res, list, i, decode)
      local r = res[i]
      assert.is_true(r.replied, "no reply to " .. list[i].label)
      local ok, v = pcall(decode or decode_json, r.body)
      assert.is_true(ok, "the reply to " .. list[i].label .. " does not decode: " .. tostring(v))
      assert.is_table(v)
      return v[1], v[2]
    end

    local function assert_error_reply(res, list, i, decode, ...)
      local code, message = reply(res, list, i, decode)
      assert.equal(1, code, "reply to " .. list[i].label .. ": " .. tostring(message))
      assert.is_string(message)
      local lower = message:lower()
      for _, word in ipairs { ... } do
        if lower:find(word, 1, true) then return end
      end
      error(("the reply to %s does not say what was wrong: %s"):format(list[i].label, message))
    end

    it("a body over max_body gets an error reply saying so", function()
      assert_error_reply(results, cases, OVER, nil, "max_body")
    end)

    it("a zstd bomb (decompressing past max_body) gets an error reply saying so", function()
      assert_error_reply(results, cases, BOMB, nil, "max_body")
    end)

    it("a truncated zstd frame gets an error reply saying it cannot be decompressed", function()
      assert_error_reply(results, cases, TRUNCATED, nil, "decompress", "truncated")
    end)

    it("a request without correlation_id is taken, and any reply to it carries no correlation id", function()
      -- (Acked and the worker serving on: see the queue test below.)
      assert.is_false(results[NO_CID].returned)
      assert.is_true(#uncorrelated <= 1)
      for _, b in ipairs(uncorrelated) do assert.is_table(cjson.decode(b)) end
    end)

    it("a good request after the bad ones is served", function()
      local code, result = reply(results, cases, GOOD)
      assert.equal(0, code)
      assert.equal("fine", result)
    end)

    it("malformed msgpack gets an error reply for each case", function()
      local says = { [MP_C1] = "0xc1", [MP_TRUNC] = "truncated", [MP_STR32] = "truncated",
                     [MP_ARR32] = "truncated", [MP_EXT] = "extension", [MP_SHAPE] = "[args, kwargs]",
                     [MP_KEY] = "key" }
      for _, i in ipairs { MP_C1, MP_TRUNC, MP_STR32, MP_ARR32, MP_EXT, MP_SHAPE, MP_KEY } do
        assert_error_reply(mp_results, mp_cases, i, decode_msgpack, says[i])
      end
      local code, result = reply(mp_results, mp_cases, MP_GOOD, decode_msgpack)
      assert.equal(0, code)
      assert.equal("fine", result)
    end)

    it("both workers still serve the Lua client, are the processes that started, and leave their queues empty",
      function()
        local cj = H.client { broker = broker }
        local cm = H.client { broker = broker, serialiser = "msgpack" }
        assert.equal("after", cj:remote_call(small:name("echo"), { "after" }))
        assert.equal("after", cm:remote_call(mp:name("echo"), { "after" }))
        -- the bound is max_body, not less: a request under it is served
        assert.equal(("y"):rep(900), cj:remote_call(small:name("echo"), { ("y"):rep(900) }))
        cj:close()
        cm:close()
        for _, h in ipairs { small, mp } do
          assert.is_true(h:alive())
          assert.not_matches("exited with status", h:log())
          assert.not_matches("killed by signal", h:log())
          assert.equal(1, #worker_pids(h), "a worker was restarted:\n" .. h:log())
          local q
          H.wait_until(function()
            q = broker:queues()["rpc_async_" .. h:name("echo")]
            return q and q.messages_ready == 0 and q.messages_unacknowledged == 0
          end, 5, 0.3)
          assert.is_table(q)
          assert.equal(0, q.messages_ready)
          assert.equal(0, q.messages_unacknowledged)
        end
      end)

    it("the host logs each request it refused (issue 5: an error reply, a log line, an ack)", function()
      -- over max_body, the zstd bomb and the truncated frame on one host;
      -- malformed msgpack on the other.
      local log = small:log()
      assert.matches("max_body", log, 1, true)
      assert.matches("decompress", log, 1, true)
      assert.matches("msgpack", mp:log(), 1, true)
    end)

    it("a reply nobody waits for (late, stray, malformed) does not disturb the client", function()
      ready()
      local c = H.client { broker = broker, timeout = 10 }
      -- late: the caller gave up before the answer came
      local success, _, err = c:try_remote_call(N("hold"), { "late", 1 }, nil, nil, { timeout = 0.3 })
      assert.is_false(success)
      assert.equal("timeout", err.kind)
      -- stray: replies with correlation ids nobody used, while a call waits
      local t = rabi.spawn(function() return c:try_remote_call(N("hold"), { "mine", 1.5 }) end)
      rabi.sleep(0.1)
      local rq = c._core:reply_queue()
      assert.is_string(rq)
      local z = zstd_bodies()
      raw_publish({
        { exchange = "", routing_key = rq, reply_to = false, correlation_id = "999999999999", body = '[0, "stray"]' },
        { exchange = "", routing_key = rq, reply_to = false, correlation_id = "not a number", body = '[0, "stray"]' },
        { exchange = "", routing_key = rq, reply_to = false, correlation_id = false, body = '[0, "stray"]' },
        { exchange = "", routing_key = rq, reply_to = false, correlation_id = "424242", body = z.bomb },
        { exchange = "", routing_key = rq, reply_to = false, correlation_id = "424243", body = "\40\181\47\253junk" },
      }, 0)
      local ok, s2, code2, r2 = rabi.wait(t)
      assert.is_true(ok)
      assert.is_true(s2, tostring(r2))
      assert.equal(0, code2)
      assert.same({ tag = "mine", pid = r2.pid }, r2)
      rabi.sleep(1.5) -- the late reply has come and gone
      assert.equal("own", c:remote_call(N("echo"), { "own" }))
      assert.equal(0, c._core:pending())
      assert.is_true(c:is_connected())
      c:close()
    end)
  end)

  describe("several brokers", function()
    -- rabihost --url A --url B, and a client with the URLs "A B": when A
    -- goes down, both go on with B (issue 5 item 3).
    local h2, c2, c_b

    setup(function()
      assert.is_truthy(H.wait_until(broker_b_started, 40), "the second broker did not start")
      assert(broker_b:wait_started(), "the second broker did not start") -- raises with its output
      ready()
      h2 = H.start { dir = "spec/fixtures/faults", broker = broker,
                     args = { "--url", broker.url, "--url", broker_b.url } }
      -- A client starts at a random URL of its list (to spread over a
      -- cluster's nodes); these two brokers are not a cluster, so take a
      -- client that started on A, where the host serves.
      for _ = 1, 30 do
        c2 = H.client { url = broker.url .. " " .. broker_b.url, timeout = 10 }
        if c2:try_remote_call(h2:name("whoami"), {}) then break end
        c2:close()
        c2 = nil
      end
      assert(c2, "30 clients in a row started on broker B")
    end)

    teardown(function()
      if c2 then c2:close() end
      if c_b then c_b:close() end
    end)

    it("the host and the client serve on the first broker while it is up", function()
      local who = c2:remote_call(h2:name("whoami"), {})
      assert.is_number(who)
      -- the host's queues are on broker A only
      local q = broker:queues()["rpc_async_" .. h2:name("echo")]
      assert.is_table(q, "the host does not serve on the first broker")
      assert.equal(1, q.consumers)
    end)

    it("when the first broker goes down, the same host and client go on with the second", function()
      local who = c2:remote_call(h2:name("whoami"), {})
      local before = log_count(h2, "serving again")
      broker:stop()
      -- The client follows by itself (its loop runs meanwhile); the call is
      -- made once the host serves on B, so it cannot meet a no_route.
      local moved = H.wait_until(function()
        rabi.sleep(0.1)
        return log_count(h2, "serving again") > before
      end, 25)
      assert.is_truthy(moved, "the host did not move to the second broker:\n" .. h2:log())
      local success, code, result = c2:try_remote_call(h2:name("echo"), { "on B" }, nil, nil, { timeout = 15 })
      assert.is_true(success, tostring(result))
      assert.equal(0, code)
      assert.equal("on B", result)
      assert.equal(who, c2:remote_call(h2:name("whoami"), {}))
      -- a client of broker B alone reaches the host: it really is on B
      c_b = H.client { broker = broker_b, timeout = 10 }
      assert.equal("via B", c_b:remote_call(h2:name("echo"), { "via B" }))
      assert.is_true(h2:alive())
    end)
  end)
end)

-- Connections (issue 11 points 7 and 8, issue 10 point 7): making one never
-- stops the loop, a worker with more functions than a connection has
-- channels is refused at start, and a function whose queue a peer holds
-- with other arguments is declared again until it is served.
local H = require "helper"

local rabi

local SIGCONT, SIGSTOP = 18, 19

describe("a frozen broker", function()
  -- B: a private broker, frozen with SIGSTOP (its kernel still accepts TCP
  -- connections; the AMQP handshake hangs). A serves the host under test.
  local b = H.Broker.new { dir = "build/connect-broker" }
  local host, on_b, client

  local function beam_pid() return tonumber((H.read_file(b.dir .. "/pid") or ""):match("%d+")) end
  local function freeze() assert.is_true(H.signal_if(beam_pid(), "beam", SIGSTOP), "cannot freeze broker B") end
  local function thaw() H.signal_if(beam_pid(), "beam", SIGCONT) end

  setup(function()
    rabi = H.rabi()
    b:start()
    host = H.start { dir = "spec/fixtures/frozen", env = { RABI_SPEC_B_URL = b.url }, functions = 3 }
    -- B serves the same functions (echo is what via_b calls there).
    on_b = H.start { dir = "spec/fixtures/frozen", broker = b, suffix = host.suffix, functions = 3 }
    client = H.client { timeout = 10 }
  end)

  teardown(function()
    thaw()
    if client then client:close() end
    H.stop_all()
    b:stop()
  end)

  -- Calls echo every 0.1 s in a task while busy() holds; -> the slowest
  -- call's seconds, the number of calls, and the failures' messages.
  local function echo_loop(busy)
    local stats = { slowest = 0, calls = 0, failures = {} }
    local task = rabi.spawn(function()
      while busy() do
        local t0 = H.now()
        local ok, v = pcall(client.remote_call, client, host:name("echo"), { "e" })
        local took = H.now() - t0
        stats.calls = stats.calls + 1
        if took > stats.slowest then stats.slowest = took end
        if not ok or v ~= "e" then stats.failures[#stats.failures + 1] = tostring(ok and v or v.message) end
        rabi.sleep(0.1)
      end
    end)
    return stats, task
  end

  -- fn() in a task of its own beside an echo loop; -> what fn returned, the
  -- echo loop's stats, and how long fn took.
  local function beside_echo(fn)
    local done, result, took = false, nil, nil
    local stats, loop = echo_loop(function() return not done end)
    rabi.spawn(function()
      local t0 = H.now()
      result = { pcall(fn) }
      took = H.now() - t0
      rabi.sleep(1) -- the loop goes on a little past the end
      done = true
    end)
    assert.is_truthy(H.drive_until(function() return done end, 30), "fn never ended")
    rabi.wait(loop)
    return result, stats, took
  end

  it("while its client reconnects: echo answers within 0.5 s throughout, calls through B fail within their timeout",
    function()
      assert.equal("before", client:remote_call(host:name("via_b"), { "before" }))
      local lost_before = select(2, host:log():gsub("broker connection lost", ""))
      freeze()
      finally(thaw)
      -- Its heartbeat (1 s) finds B gone within about 2 s; nothing is
      -- published to B before. A publish on a live link to a frozen broker
      -- can block inside rabbitmq-c's amqp_basic_publish, which polls the
      -- socket without a deadline: a known limit, not one of connecting.
      assert.is_truthy(H.drive_until(function()
        return select(2, host:log():gsub("broker connection lost", "")) > lost_before
      end, 10), "the client never noticed B froze:\n" .. host:log())
      local results = {}
      local _, stats = beside_echo(function()
        -- The client reconnects, and each try hangs in the handshake for
        -- its connect_timeout (2 s).
        local deadline = H.now() + 9
        while H.now() < deadline do
          local t0 = H.now()
          local ok, err = pcall(client.remote_call, client, host:name("via_b"), { "x" })
          results[#results + 1] = { ok = ok, err = err, took = H.now() - t0 }
        end
      end)
      assert.same({}, stats.failures)
      assert.is_true(stats.slowest < 0.5, ("the slowest echo took %.2f s:\n%s"):format(stats.slowest, host:log()))
      assert.is_true(stats.calls >= 20, "only " .. stats.calls .. " echo calls")
      assert.is_true(#results >= 2)
      for _, r in ipairs(results) do
        assert.is_false(r.ok)
        -- the handler's own call to B timed out (2 s): a clear error, in time
        assert.is_true(r.took < 4, ("a call through B took %.2f s"):format(r.took))
        local m = tostring(type(r.err) == "table" and r.err.message or r.err)
        assert.is_truthy(m:find("within 2 s", 1, true) or m:find("connection to the broker lost", 1, true), m)
      end
      -- The client did try to reconnect, and those tries hung in the handshake.
      local tried = H.wait_until(function() return host:log():match("client: reconnection failed[^\n]*") end, 5)
      assert.is_string(tried, "the client never tried to reconnect:\n" .. host:log())
      print(("\n  frozen B, client reconnecting: %d echo calls, slowest %.3f s, 0 failures; %d calls through B, "
        .. "all failed in time"):format(stats.calls, stats.slowest, #results))
      thaw()
      local back = H.drive_until(function()
        local ok, v = pcall(client.remote_call, client, host:name("via_b"), { "after" })
        return ok and v
      end, 30, 0.5)
      assert.equal("after", back, "calls through B never came back:\n" .. host:log())
    end)

  it("while a handler connects to it: echo answers within 0.5 s, the connect fails within its connect_timeout",
    function()
      assert.equal("connected", client:remote_call(host:name("connect_b"), {}))
      freeze()
      finally(thaw)
      local result, stats, took = beside_echo(function()
        return client:remote_call(host:name("connect_b"), {})
      end)
      assert.is_false(result[1])
      assert.matches("log in", result[2].message, 1, true)
      assert.is_true(took < 4, ("connect_b took %.2f s"):format(took))
      assert.same({}, stats.failures)
      assert.is_true(stats.calls >= 15, "only " .. stats.calls .. " echo calls")
      assert.is_true(stats.slowest < 0.5, ("the slowest echo took %.2f s:\n%s"):format(stats.slowest, host:log()))
      print(("\n  frozen B, a handler connecting: %d echo calls, slowest %.3f s, 0 failures; connect_b failed "
        .. "after %.2f s: %s"):format(stats.calls, stats.slowest, took, result[2].message))
      thaw()
      assert.equal("connected", H.drive_until(function()
        local ok, v = pcall(client.remote_call, client, host:name("connect_b"), {})
        return ok and v
      end, 30, 0.5))
    end)

  it("a script's other tasks run on while its connect waits for a frozen broker", function()
    freeze()
    finally(thaw)
    local ticks, err, took = 0, nil, nil
    local done = false
    rabi.spawn(function()
      local t0 = H.now()
      local c = rabi.client { url = b.url, connect_timeout = 2 }
      local ok, e = pcall(c.connect, c)
      took, err = H.now() - t0, (not ok) and e or nil
      done = true
    end)
    H.drive_until(function()
      ticks = ticks + 1
      return done
    end, 10, 0.05)
    assert.is_true(done)
    assert.equal("connection", err and err.kind)
    assert.is_true(took < 4, ("the connect took %.2f s"):format(took))
    -- driven every 0.05 s through the 2 s the connect waited
    assert.is_true(ticks >= 20, "the loop ran " .. ticks .. " times")
  end)
end)

describe("more functions than a connection has channels", function()
  teardown(function() H.stop_all() end)

  it("3,000 functions in one worker: refused at start with a clear message, exit 78, no restart loop", function()
    local host = H.start { dir = "spec/fixtures/manyfuncs", env = { RABI_SPEC_NFUNCS = "3000" }, wait = false }
    local code = host:wait_exit(60)
    local log = host:log()
    assert.equal(78, code, log)
    assert.matches("registers 3000 functions", log, 1, true)
    assert.matches("allows 2047 channels per connection", log, 1, true)
    assert.matches("at most 2044 functions per worker", log, 1, true)
    assert.not_matches("restarting in", log, 1, true)
    local _, refusals = log:gsub("registers 3000 functions", "")
    assert.equal(1, refusals, log)
    -- Nothing was declared.
    local queues = H.queues()
    assert.is_nil(queues["rpc_async_" .. host:name("f1")])
    assert.is_nil(queues["rpc_async_" .. host:name("f3000")])
  end)
end)

describe("a queue a peer holds with other arguments", function()
  teardown(function() H.stop_all() end)
  local DIR = "spec/fixtures/production_reregister"

  -- A queue left by a host that declared it with x-max-length 5.
  local function held_queue(suffix)
    local a = H.start { dir = DIR, suffix = suffix, env = { RABI_SPEC_QUEUE_SIZE = "5" }, functions = 2 }
    assert.equal(0, a:stop())
    local queue = "rpc_async_sized" .. suffix
    assert.equal(5, H.queues()[queue].arguments["x-max-length"])
    return queue
  end

  local function log_match(host, pattern, timeout)
    return H.wait_until(function() return host:log():match(pattern) end, timeout or 10)
  end

  it("refused at start: retried with a growing pause, served once the queue is free", function()
    local suffix = H.new_suffix()
    local queue = held_queue(suffix)
    local b = H.start { dir = DIR, suffix = suffix, env = { RABI_SPEC_QUEUE_SIZE = "10" } }
    assert.equal(1, b.serving)
    local refused = b:log():match("[^\n]*cannot serve sized" .. suffix .. "[^\n]*")
    assert.is_string(refused, b:log())
    assert.matches("PRECONDITION_FAILED", refused, 1, true)
    assert.matches("retrying in 1 s", refused, 1, true)
    assert.is_string(log_match(b, "sized" .. suffix .. ": not serving: [^\n]*retry 1 in 2 s"), b:log())
    H.ctl("delete_queue " .. H.quote(queue))
    local t0 = H.now()
    local tries = log_match(b, "sized" .. suffix .. ": serving again after (%d+) tr", 20)
    assert.is_string(tries, "never served after the queue was deleted:\n" .. b:log())
    assert.is_true(H.now() - t0 < 10)
    local client = H.client { timeout = 5 }
    assert.equal(10, client:remote_call("sized" .. suffix, {}))
    client:close()
    assert.equal(10, H.queues()[queue].arguments["x-max-length"])
    assert.equal(0, b:stop())
  end)

  it("refused after a reconnection: retried, served once the queue is free", function()
    local suffix = H.new_suffix()
    local queue = held_queue(suffix)
    local b = H.start { dir = DIR, suffix = suffix, env = { RABI_SPEC_QUEUE_SIZE = "10" } }
    assert.is_string(log_match(b, "sized" .. suffix .. ": not serving: [^\n]*retry 1 in 2 s"), b:log())
    -- Its connection closed by the broker while the queue is still held.
    local ports = H.wait_until(function()
      local pids = {}
      for pid in b:log():gmatch("%[(%d+) w%d+%] serving %d") do pids[#pids + 1] = tonumber(pid) end
      local p = pids[1] and H.broker_ports_of(pids[1])
      return p and #p > 0 and p
    end, 10)
    assert.is_table(ports, "the worker has no connection:\n" .. b:log())
    local closed = false
    for _, conn in ipairs(H.connections()) do
      if conn.peer_port == ports[1] then
        H.close_connection(conn.pid)
        closed = true
      end
    end
    assert.is_true(closed)
    local after = log_match(b, "broker connection lost.-(sized" .. suffix
      .. ": not serving: [^\n]*PRECONDITION_FAILED[^\n]*declaring it again in 1 s)", 20)
    assert.is_string(after, "the refusal after the reconnection is not retried:\n" .. b:log())
    H.ctl("delete_queue " .. H.quote(queue))
    local tries = log_match(b, "broker connection lost.-sized" .. suffix .. ": serving again after (%d+) tr", 20)
    assert.is_string(tries, "never served after the queue was deleted:\n" .. b:log())
    local client = H.client { timeout = 5 }
    assert.equal(10, client:remote_call("sized" .. suffix, {}))
    client:close()
    assert.equal(0, b:stop())
  end)
end)

-- Stuck handlers, poison requests, orphans and memory (issue 11, points 3,
-- 4 and 8; host/watchdog.c, host/heap.c): a handler that never yields gets
-- its worker replaced and its caller an error; a request that kills its
-- worker is answered with an error after delivery_limit deaths; workers go
-- with their supervisor; a worker past heap_limit hands over to a new one;
-- a large request's memory is given back.
--
-- Every host here keeps its queues through a worker's death (durable
-- queues, the default), so that the calls a dead worker held wait for its
-- successor: the point is that none of them fails.
local H = require "helper"

local function start(args)
  return H.start { dir = "spec/fixtures/watchdog", args = args, functions = 9 }
end

-- Calls name on host, expecting the remote error the watchdog answers with.
-- -> that error value
local function call_error(client, host, name)
  return H.expect_error("remote", client.remote_call, client, host:name(name), {}, nil, nil, { timeout = 30 })
end

-- A process that has exited (gone, or a zombie nobody reaps).
local function gone(pid)
  local status = H.read_file("/proc/" .. pid .. "/status")
  return status == nil or status:match("State:%s*Z") ~= nil
end

-- Calls echo over and over in a task of its own until stop() is called.
-- -> stop (returns { calls =, failures = { messages }, summary = text })
local function echo_loop(client, host)
  local rabi = H.rabi()
  local stats, stopping = { calls = 0, failures = {} }, false
  local task = rabi.spawn(function()
    local n = 0
    while not stopping do
      n = n + 1
      local ok, code, result = client:try_remote_call(host:name("echo"), { n }, nil, nil, { timeout = 30 })
      stats.calls = stats.calls + 1
      if not (ok and code == 0 and result == n) then
        stats.failures[#stats.failures + 1] = ("%s: %s"):format(result and result.kind or code,
          result and result.message or tostring(result))
      end
      rabi.sleep(0.02)
    end
  end)
  return function()
    stopping = true
    local ok, err = rabi.wait(task)
    assert(ok, err)
    stats.summary = ("echo: %d calls, %d failed%s"):format(stats.calls, #stats.failures,
      #stats.failures > 0 and (": " .. stats.failures[1]) or "")
    return stats
  end
end

describe("a handler that never yields", function()
  local host, client
  setup(function()
    host = start { "-w", "1", "--stall-limit", "3" }
    client = H.client()
  end)
  teardown(function()
    client:close()
    H.stop_all()
  end)

  it("gets its worker replaced: echo answers from the new one, and the caller gets an error", function()
    local pid0 = client:remote_call(host:name("whoami"), {})
    local stop = echo_loop(client, host)
    H.rabi().sleep(0.3)
    local t0 = H.now()
    local err = call_error(client, host, "spin")
    local waited = H.now() - t0
    H.rabi().sleep(1)
    local stats = stop()
    local pid1 = client:remote_call(host:name("whoami"), {})
    print(("\n  stall: the spinning call answered after %.1f s: %s\n  %s"):format(waited, err.message,
      stats.summary))
    assert.matches("held its worker's loop for [%d.]+ s without yielding %(stall_limit 3 s%)", err.message)
    assert.matches(host:name("spin"), err.message, 1, true)
    assert.equal(0, #stats.failures)
    assert.is_true(stats.calls > 10)
    assert.are_not.equal(pid0, pid1)
    assert.is_true(gone(pid0))
    -- The supervisor names the function and the call.
    assert.matches("worker 0 %(pid " .. pid0 .. "%) stalled: " .. host:name("spin") .. " %(cid %d+, reply_to ",
      host:log())
    -- The request came back to the new worker, which acked it unrun.
    assert.equal(1, host:log_count("watchdog: spin taken by"))
  end)

  it("answers a JSON caller in JSON", function()
    local r = H.raw_publish({ { routing_key = "async_" .. host:name("spin"), body = "[[], {}]" } }, 20)[1]
    assert.is_true(r.replied)
    assert.matches('^%[1, "rabihost: ' .. host:name("spin") .. ' %(cid 1001%) held its worker\'s loop', r.body)
    assert.same({ 1 }, { (require("cjson").decode(r.body))[1] })
  end)

  it("is found in a task its handler spawned, and that call's caller is answered", function()
    local err = call_error(client, host, "spin_spawned")
    assert.matches(host:name("spin_spawned") .. " %(cid %d+%) held its worker's loop", err.message)
    assert.equal(42, client:remote_call(host:name("echo"), { 42 }))
  end)
end)

describe("a request that kills its worker", function()
  teardown(function() H.stop_all() end)

  it("is answered with an error after delivery_limit deaths, and echo never fails meanwhile", function()
    local host = start { "-w", "2" }
    local client = H.client()
    local stop = echo_loop(client, host)
    H.rabi().sleep(0.3)
    local err = call_error(client, host, "crash")
    H.rabi().sleep(0.5)
    local stats = stop()
    local runs = host:log_count("watchdog: crash taken by")
    local deaths = host:log_count("exited with status 3 while running " .. host:name("crash"))
    print(("\n  poison: run %d times, %d worker deaths, then: %s\n  %s"):format(runs, deaths, err.message,
      stats.summary))
    assert.matches("was not run again: its worker died while running it 2 times %(delivery_limit 2%)",
      err.message)
    assert.equal(2, runs)
    assert.equal(2, deaths)
    assert.equal(0, #stats.failures)
    assert.is_true(stats.calls > 10)
    assert.matches("answering cid %d+ with an error instead of running it", host:log())
    client:close()
  end)

  it("runs once with --delivery-limit 1", function()
    local host = start { "-w", "1", "--delivery-limit", "1" }
    local client = H.client()
    local err = call_error(client, host, "crash")
    assert.matches("died while running it 1 time %(delivery_limit 1%)", err.message)
    assert.equal(1, host:log_count("watchdog: crash taken by"))
    assert.equal(7, client:remote_call(host:name("echo"), { 7 }))
    client:close()
  end)
end)

describe("the supervisor's death", function()
  teardown(function() H.stop_all() end)

  it("takes its workers with it", function()
    local host = start { "-w", "2", "--drain-timeout", "2" }
    local pids = host:worker_pids(2)
    assert.equal(2, #pids)
    host:kill("KILL")
    local t0 = H.now()
    local all_gone = H.wait_until(function() return gone(pids[1]) and gone(pids[2]) end, 15, 0.1)
    print(("\n  supervisor killed: its 2 workers gone after %.1f s"):format(H.now() - t0))
    assert.is_truthy(all_gone)
    assert.equal(2, host:log_count("draining: 0 calls in flight"))
  end)

  it("takes a worker stuck in a handler too, once its drain has had its time", function()
    local host = start { "-w", "1", "--drain-timeout", "1", "--stall-limit", "0" }
    local pid = host:worker_pids()[1]
    local client = H.client()
    H.expect_error("timeout", client.remote_call, client, host:name("spin"), {}, nil, nil, { timeout = 0.5 })
    host:kill("KILL")
    local t0 = H.now()
    local ended = H.wait_until(function() return gone(pid) end, 20, 0.2)
    print(("\n  supervisor killed: its stuck worker gone after %.1f s"):format(H.now() - t0))
    assert.is_truthy(ended)
    client:close()
  end)
end)

describe("a worker whose Lua heap passes heap_limit", function()
  teardown(function() H.stop_all() end)

  it("finishes its calls and hands over to a new worker; no call fails", function()
    local host = start { "-w", "1", "--heap-limit", "48" }
    local client = H.client()
    local pid0 = client:remote_call(host:name("whoami"), {})
    local stop = echo_loop(client, host)
    local mib = client:remote_call(host:name("hoard"), { 40 })
    local pid1 = H.wait_until(function()
      local p = client:remote_call(host:name("whoami"), {}, nil, nil, { timeout = 30 })
      return p ~= pid0 and p
    end, 20, 0.2)
    H.rabi().sleep(0.3)
    local stats = stop()
    print(("\n  heap: %.0f MiB past a 48 MiB limit; worker %d replaced by %s\n  %s"):format(mib, pid0,
      tostring(pid1), stats.summary))
    assert.is_true(mib > 48)
    assert.is_truthy(pid1)
    assert.equal(0, #stats.failures)
    assert.is_truthy(H.wait_until(function() return gone(pid0) end, 10))
    assert.matches("past heap_limit %(48 MiB%)", host:log())
    assert.matches("starting its successor", host:log(), 1, true)
    assert.is_true(client:remote_call(host:name("heap"), {}) < 48 * 1024)
    client:close()
  end)
end)

describe("a large request", function()
  teardown(function() H.stop_all() end)

  it("gives its memory back once it is answered", function()
    local host = start { "-w", "1" }
    local client = H.client { timeout = 30 }
    local big, rss = host:name("big"), host:name("rss")
    -- Warm up: contexts and buffers every call needs are not the point.
    client:remote_call(big, { ("x"):rep(4096) })
    H.rabi().sleep(0.5)
    local before = client:remote_call(rss, {})
    local parts = {}
    for i = 1, 4 * 1024 * 1024 / 16 do parts[i] = ("%016x"):format(i * 2654435761 % 2 ^ 52) end
    local r = client:remote_call(big, { table.concat(parts) })
    assert.equal(4 * 1024 * 1024, r.len)
    H.rabi().sleep(1)
    local after = client:remote_call(rss, {})
    print(("\n  resident memory: %d KiB before a 4 MiB request, %d KiB during it, %d KiB 1 s after")
      :format(before, r.rss, after))
    assert.is_true(r.rss - before > 4096)
    -- AddressSanitizer keeps freed memory in quarantine, by design.
    if not os.getenv("ASAN_OPTIONS") then assert.is_true(after - before < 3072) end
    client:close()
  end)
end)

describe("the watchdog's settings", function()
  it("are refused at start when they are not numbers they can be", function()
    for _, case in ipairs {
      { "--stall-limit", "-1", "--stall%-limit %(app%.stall_limit%) needs a number of seconds >= 0, got %-1" },
      { "--delivery-limit", "1.5", "--delivery%-limit %(app%.delivery_limit%) needs a whole number >= 0, got 1%.5" },
      { "--heap-limit", "lots", "--heap%-limit %(app%.heap_limit%) needs a number of MiB >= 0, got lots" },
    } do
      local res = H.cli { "serve", case[1], case[2], "spec/fixtures/watchdog" }
      assert.equal(64, res.code)
      assert.matches(case[3], res.stderr)
    end
  end)

  it("come from the config's app section, and show-config says so", function()
    local cfg = H.tmpname("limits") .. ".lua"
    H.write_file(cfg, "app = { stall_limit = 4, delivery_limit = 3 }\n")
    local out = H.cli({ "show-config", "-c", cfg }).stdout
    assert.matches("stall_limit%s+4%s+%(config file%)", out)
    assert.matches("delivery_limit%s+3%s+%(config file%)", out)
    assert.matches("heap_limit%s+1024%s+%(default%)", out)
  end)
end)

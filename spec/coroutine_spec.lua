-- Waits inside the user's own coroutines (issue 11, point 6): a rabi.sleep,
-- a remote call or a rabi.wait inside coroutine.wrap or coroutine.resume
-- parks the whole call in the worker's event loop, never a loop of its own,
-- and coroutines keep the semantics of plain Lua. Every host here runs one
-- worker, as the issue measured.
local H = require "helper"

local FIX = "spec/fixtures/coro"
local semantics = dofile(FIX .. "/semantics.lua")
-- What the stock library of plain LuaJIT does, with nothing waiting.
local REFERENCE = semantics(coroutine, function() end)

local rabi
setup(function() rabi = H.rabi() end)

-- Asserts that lines (a list) equal REFERENCE, naming the first difference.
local function assert_plain_lua(lines, where)
  for i = 1, math.max(#lines, #REFERENCE) do
    assert.equal(REFERENCE[i], lines[i], ("%s, observation %d differs from plain LuaJIT"):format(where, i))
  end
end

-- Checks what coro_work(i) returned. -> true, or false and why
local function work_ok(i, r)
  if not r.ok then return false, tostring(r.value) end
  local v = r.value
  if v.echoed ~= i or v.a ~= i + 1 or v.b ~= 2 * (i + 1) or v.status ~= "dead" then
    return false, ("coro_work(%d) returned echoed=%s a=%s b=%s status=%s"):format(i, tostring(v.echoed),
      tostring(v.a), tostring(v.b), tostring(v.status))
  end
  return true
end

describe("a handler waiting inside coroutine.wrap and coroutine.resume", function()
  local fx = H.host_fixture { dir = FIX .. "/service.lua", args = { "-w", "1" }, client = { timeout = 30 } }
  local host, client
  local function N(base) return host:name(base) end
  setup(function() host, client = fx:start() end)
  teardown(function() fx:stop() end)

  it("answers 300 concurrent calls that sleep and call out in about the time of one", function()
    local t0 = H.now()
    assert.is_true(work_ok(0, { ok = true, value = client:remote_call(N("coro_work"), { 0, 1 }) }))
    local one = H.now() - t0
    local results, elapsed = H.concurrently(300, function(i)
      return client:remote_call(N("coro_work"), { i, 1 })
    end)
    local answered, first_bad = 0, nil
    for i, r in ipairs(results) do
      local ok, why = work_ok(i, r)
      if ok then answered = answered + 1 else first_bad = first_bad or why end
    end
    print(("\ncoroutine_spec: one call %.2f s; %d of 300 concurrent calls answered in %.2f s")
      :format(one, answered, elapsed))
    assert.equal(300, answered, first_bad)
    assert.is_true(elapsed < 5 * one,
      ("300 calls took %.2f s, one took %.2f s: the waits ran one after another"):format(elapsed, one))
  end)

  it("keeps the semantics of plain Lua's coroutines, with waits between every step", function()
    assert_plain_lua(client:remote_call(N("coro_semantics")), "in a handler")
  end)

  it("lets the caller's deadline cancel a wait two coroutines deep, and every later wait", function()
    local ok, _, err = client:try_remote_call(N("coro_deadline"), { 10 }, nil, nil, { timeout = 1 })
    assert.is_false(ok)
    assert.equal("timeout", err.kind)
    local line = H.wait_until(function()
      return host:log():match("spec coro_deadline: ([^\n]*)")
    end, 5)
    assert.is_not_nil(line, "the handler did not go on after its deadline:\n" .. host:log())
    local after, kind, kind2 = line:match("^sleep failed after ([%d.]+) s %((%w+)%), then failed %((%w+)%) trace_id=%x+$")
    assert.is_not_nil(after, "unexpected: " .. line)
    assert.equal("cancelled", kind)
    assert.equal("cancelled", kind2)
    assert.is_true(tonumber(after) < 3, "the sleep was cancelled only after " .. after .. " s")
  end)

  it("passes an error raised inside a wrap after a wait to the caller", function()
    local err = H.expect_error("remote", client.remote_call, client, N("coro_raises"))
    assert.matches("raised inside a wrap", err.message, 1, true)
  end)

  it("serves a script's and a REPL's waits inside coroutine.wrap", function()
    local res = H.cli({ "run", FIX .. "/script.lua", host.suffix })
    assert.equal(0, res.code, res.stderr)
    local answered, n, took = res.stdout:match("answered (%d+) of (%d+) in ([%d.]+) s")
    assert.is_not_nil(answered, res.stdout .. res.stderr)
    assert.equal(n, answered)
    assert.is_true(tonumber(took) < 5, "20 one-second waits in a script took " .. took .. " s")
    for _, who in ipairs { "main", "task" } do
      local lines = {}
      for line in res.stdout:gmatch(who .. ": ([^\n]*)") do lines[#lines + 1] = line end
      assert_plain_lua(lines, "in a script's " .. who)
    end
    assert.matches("c call: true [^\n]*cannot wait inside a C call", res.stdout)

    local repl = H.cli({ "repl" }, { stdin = table.concat({
      "t0 = rabi.now()",
      "ts = {} for i = 1, 20 do ts[i] = rabi.spawn(function() return coroutine.wrap(function() "
        .. "rabi.sleep(1) return client:remote_call('coro_echo" .. host.suffix .. "', { i }) end)() end) end",
      "n = 0 for i = 1, 20 do local ok, v = rabi.wait(ts[i]) if ok and v == i then n = n + 1 end end",
      "print(('repl answered %d in %.2f s'):format(n, rabi.now() - t0))",
      "g = coroutine.wrap(function() for i = 1, 3 do rabi.sleep(0.01) coroutine.yield(i) end end)",
      "print('repl main', g(), g(), g())",
    }, "\n") .. "\n" })
    assert.equal(0, repl.code, repl.stderr)
    local got, secs = repl.stdout:match("repl answered (%d+) in ([%d.]+) s")
    assert.is_not_nil(got, repl.stdout .. repl.stderr)
    assert.equal("20", got)
    assert.is_true(tonumber(secs) < 5, "20 one-second waits in the REPL took " .. secs .. " s")
    assert.matches("repl main\t1\t2\t3", repl.stdout, 1, true)
  end)
end)

describe("rabi.coroutine from plain LuaJIT", function()
  local function wait() rabi.sleep(0.001) end

  it("keeps plain Lua's semantics in a task and on the main thread", function()
    local ok, lines = rabi.wait(rabi.spawn(semantics, rabi.coroutine, wait))
    assert.is_true(ok, tostring(lines))
    assert_plain_lua(lines, "in a task")
    assert_plain_lua(semantics(rabi.coroutine, wait), "on the main thread")
  end)

  it("runs waits in wraps side by side: 20 one-second sleeps in about one second", function()
    local t0 = H.now()
    local tasks = {}
    for i = 1, 20 do
      tasks[i] = rabi.spawn(function()
        return rabi.coroutine.wrap(function(x) rabi.sleep(1) return x end)(i)
      end)
    end
    for i, t in ipairs(tasks) do assert.same({ true, i }, { rabi.wait(t) }) end
    local took = H.now() - t0
    assert.is_true(took < 5, ("20 one-second sleeps in wraps took %.2f s"):format(took))
  end)

  it("lets task:cancel() reach a wait inside a user coroutine", function()
    local t = rabi.spawn(function()
      return rabi.coroutine.wrap(function() return pcall(rabi.sleep, 10) end)()
    end)
    rabi.sleep(0.05)
    local t0 = H.now()
    assert.is_true(t:cancel())
    local ok, slept, err = rabi.wait(t)
    assert.is_true(ok)
    assert.is_false(slept)
    assert.equal("cancelled", err.kind)
    assert.is_true(H.now() - t0 < 1)
  end)

  it("refuses a wait in a stock coroutine inside a task, rather than running a loop of its own", function()
    local ok, err = rabi.wait(rabi.spawn(function()
      return coroutine.wrap(function() rabi.sleep(0.01) end)()
    end))
    assert.is_false(ok)
    assert.matches("stock coroutine library", tostring(err), 1, true)
    -- the task after it is fine
    assert.same({ true, 1 }, { rabi.wait(rabi.spawn(function() rabi.sleep(0.01) return 1 end)) })
  end)

  it("refuses a wait inside a C call of a task (a sort comparator), and the task goes on", function()
    local ok, caught, msg, after = rabi.wait(rabi.spawn(function()
      local caught, e = pcall(table.sort, { 3, 1, 2 }, function(a, b)
        rabi.sleep(0.01)
        return a < b
      end)
      rabi.sleep(0.01)
      return caught, e, "after"
    end))
    assert.is_true(ok)
    assert.is_false(caught)
    assert.matches("cannot wait inside a C call", tostring(msg), 1, true)
    assert.equal("after", after)
  end)

  it("does not let anyone resume a coroutine parked in a wait, or a task's own", function()
    local parked, entry
    local t = rabi.spawn(function()
      entry = coroutine.running()
      return rabi.coroutine.wrap(function()
        parked = coroutine.running()
        rabi.sleep(0.2)
        return "woke"
      end)()
    end)
    assert.equal("normal", rabi.coroutine.status(parked))
    assert.equal("normal", rabi.coroutine.status(entry))
    assert.same({ false, "cannot resume running coroutine" }, { rabi.coroutine.resume(parked, "injected") })
    assert.same({ false, "cannot resume running coroutine" }, { rabi.coroutine.resume(entry) })
    assert.same({ true, "woke" }, { rabi.wait(t) })
    assert.equal("dead", rabi.coroutine.status(parked))
  end)
end)

describe("SIGTERM with calls waiting inside coroutine.wrap", function()
  after_each(function() H.stop_all() end)

  it("drains: all 300 calls in flight are answered and the worker exits", function()
    local host = H.start { dir = FIX .. "/service.lua", args = { "-w", "1", "--drain-timeout=20" } }
    local client = H.client { timeout = 30 }
    local results, tasks = {}, {}
    for i = 1, 300 do
      tasks[i] = rabi.spawn(function()
        local ok, v = pcall(client.remote_call, client, host:name("coro_work"), { i, 2 })
        results[i] = { ok = ok, value = v }
      end)
    end
    -- Every call has reached its handler once the one after it waits in
    -- the worker too (fetch_size is far above 300); give them a moment.
    rabi.sleep(1)
    local t0 = H.now()
    host:kill("TERM")
    for _, t in ipairs(tasks) do rabi.wait(t) end
    local code = host:wait_exit(20)
    local took = H.now() - t0
    client:close()
    local answered, first_bad = 0, nil
    for i = 1, 300 do
      local ok, why = work_ok(i, results[i])
      if ok then answered = answered + 1 else first_bad = first_bad or why end
    end
    print(("\ncoroutine_spec: SIGTERM with 300 calls in wraps: %d answered, exit %s after %.2f s")
      :format(answered, tostring(code), took))
    assert.equal(300, answered, first_bad)
    assert.equal(0, code, host:log())
    assert.is_true(took < 15, ("the drain took %.2f s"):format(took))
    assert.not_matches("left unacked", host:log(), 1, true)
  end)

  it("cancels a wait inside a wrap when the drain runs out of time, and answers its caller", function()
    local host = H.start { dir = FIX .. "/service.lua", args = { "-w", "1", "--drain-timeout=1" } }
    local client = H.client { timeout = 30 }
    local outcome
    local t = rabi.spawn(function()
      outcome = H.catch(client.remote_call, client, host:name("coro_work"), { 1, 60 })
    end)
    rabi.sleep(0.5)
    local t0 = H.now()
    host:kill("TERM")
    rabi.wait(t)
    local code = host:wait_exit(15)
    local took = H.now() - t0
    client:close()
    assert.is_not_nil(outcome, "the 60 s call was answered as if it had slept")
    assert.equal("remote", outcome.kind, tostring(outcome))
    assert.matches("cancel", outcome.message)
    assert.equal(0, code, host:log())
    assert.is_true(took < 10, ("the drain took %.2f s"):format(took))
  end)
end)

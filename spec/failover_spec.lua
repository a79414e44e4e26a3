-- A node of the three dying under a steady call loop (issue 13): functions
-- on quorum queues, a host and clients that take every node's URL. Each
-- kill prints the calls answered, failed by kind, and unanswered (timed
-- out), and how long no call was answered; unanswered must be 0.
local H = require "helper"
local C = require "cluster_helper"

-- A call's own timeout: far above a node's recovery, so that a call that
-- times out was lost, not slow.
local CALL_TIMEOUT = 15

-- Calls `name` (echo-like: it returns its first argument) from `loops`
-- tasks side by side, each again as soon as it has its answer. -> stats,
-- stop(): ends the loops and waits for their last calls.
-- stats: answered, failed (kind -> count), unanswered (timeouts), wrong
-- (answers that are not the argument), answer_times (H.now() of each).
local function call_loop(client, name, loops, extra_arg)
  local rabi = H.rabi()
  local st = { answered = 0, failed = {}, unanswered = 0, wrong = 0, answer_times = {}, messages = {} }
  local stopping = false
  local tasks = {}
  for i = 1, loops do
    tasks[i] = rabi.spawn(function()
      local n = 0
      while not stopping do
        n = n + 1
        local payload = ("%d-%d"):format(i, n)
        local ok, code, res = client:try_remote_call(name, { payload, extra_arg }, nil, nil,
          { timeout = CALL_TIMEOUT })
        if ok and code == 0 then
          if res == payload then
            st.answered = st.answered + 1
            st.answer_times[#st.answer_times + 1] = H.now()
          else
            st.wrong = st.wrong + 1
          end
        else
          local kind = ok and "remote" or res.kind
          if kind == "timeout" then st.unanswered = st.unanswered + 1 end
          st.failed[kind] = (st.failed[kind] or 0) + 1
          st.messages[kind] = ok and tostring(res) or res.message
          rabi.sleep(0.05) -- a client reconnecting fails fast: no busy loop
        end
      end
    end)
  end
  return st, function()
    stopping = true
    for _, t in ipairs(tasks) do rabi.wait(t) end
  end
end

-- The longest time without an answer between `from` and `to` (the outage
-- a kill caused).
local function outage(st, from, to)
  local last, longest = from, 0
  for _, t in ipairs(st.answer_times) do
    if t >= from then
      if t - last > longest then longest = t - last end
      last = t
    end
  end
  return math.max(longest, to - last)
end

local function failed_total(st)
  local n = 0
  for _, c in pairs(st.failed) do n = n + c end
  return n
end

local function report(what, st, gap)
  local kinds = {}
  for kind, c in pairs(st.failed) do kinds[#kinds + 1] = ("%s %d (%s)"):format(kind, c, st.messages[kind]) end
  table.sort(kinds)
  print(("\n  %s: %d answered, %d failed%s, %d unanswered; no answer for %.2f s at most"):format(what,
    st.answered, failed_total(st), #kinds > 0 and (": " .. table.concat(kinds, "; ")) or "", st.unanswered, gap))
end

-- Revives node n and waits until queue q has all three members online.
local function revive(n, q)
  C.revive(n)
  assert(H.wait_until(function() return C.all_online(q) end, 30, 0.5),
    "node " .. n .. " revived, but the queue's members are not all online")
end

-- 40 loops calling `name` (slow: 0.1 s each, 12 served at a time, so that
-- requests wait in its queue q), node n killed 2 s in, the loops going on
-- 8 s more; then the counts are printed and n revived. -> stats, the
-- outage (seconds)
local function kill_under_load(client, what, name, q, n)
  local rabi = H.rabi()
  local st, stop = call_loop(client, name, 40, 0.1)
  rabi.sleep(2)
  local answered_before = st.answered
  local t_kill = H.now()
  C.kill(n)
  rabi.sleep(8)
  local t_end = H.now()
  stop()
  assert(answered_before > 0, "no call was answered before the kill")
  local gap = outage(st, t_kill, t_end)
  report(what:format(n), st, gap)
  revive(n, q)
  return st, gap
end

-- Every call answered, with its own argument.
local function assert_all_answered(st)
  assert.are.equal(0, st.unanswered)
  assert.are.equal(0, st.wrong)
  assert.are.same({}, st.failed)
end

describe("a cluster losing a node under calls #cluster", function()
  local host, urls, S

  setup(function()
    C.require_cluster()
    urls = C.urls
    -- One worker per node (worker n starts at node n), each with every URL.
    host = H.start { dir = "spec/fixtures/cluster", args = { "-w", "3", "--url", urls[1], "--url", urls[2],
      "--url", urls[3] }, broker = { url = urls[1] }, functions = 5 }
    S = host.suffix
  end)

  teardown(function()
    H.stop_all()
    -- Every node up for the spec files after this one.
    for n = 1, 3 do
      if not C.reachable(n) then C.revive(n) end
    end
  end)

  it("spreads the host's workers over the three nodes", function()
    local workers = {}
    local conns = assert(H.wait_until(function()
      local c = C.connections()
      return c["rabihost worker 2"] and c
    end, 10))
    for w = 0, 2 do
      local nodes = conns["rabihost worker " .. w]
      assert.are.equal(1, #nodes, "worker " .. w .. " has " .. #(nodes or {}) .. " connections")
      workers[nodes[1]] = w
    end
    assert.are.same({ [1] = 0, [2] = 1, [3] = 2 }, workers)
  end)

  it("declares quorum queues with the bounds of classic ones, plus the delivery limit", function()
    local q = "rpc_async_bounded" .. S
    local row = C.queue(q, 1, "name type durable auto_delete arguments")
    assert.is_truthy(row, "the broker has no queue " .. q)
    assert.are.equal("quorum", row.type)
    assert.is_true(row.durable)
    assert.is_false(row.auto_delete)
    -- rabbitmqctl's JSON gives each argument as [key, AMQP type, value].
    local args = {}
    for _, a in ipairs(row.arguments) do args[a[1]] = a[3] end
    assert.are.equal("quorum", args["x-queue-type"])
    assert.are.equal("reject-publish", args["x-overflow"])
    assert.are.equal(30000, args["x-message-ttl"])
    assert.are.equal(500, args["x-max-length"])
    -- delivery_limit 3: the host refuses the request after 3 + 3 deliveries
    -- without an answer (README), and the broker drops it one above that.
    assert.are.equal(7, args["x-delivery-limit"])
  end)

  it("refuses at start what RabbitMQ refuses for quorum queues, naming the setting", function()
    local fixture = H.tmpname("quorum-fixture")
    H.run { "mkdir", "-p", fixture }
    H.write_file(fixture .. "/svc.lua", 'require("rabibridge").register_call("qad", '
      .. '{ queue_type = "quorum", auto_delete = true }, function() end)\n')
    local res = H.cli({ "serve", "--url", urls[1], fixture }, { timeout = 20 })
    assert.are_not.equal(0, res.code)
    assert.matches("a quorum queue cannot be auto_delete (RabbitMQ refuses it)", res.stdout .. res.stderr, 1, true)
    H.run { "rm", "-rf", fixture }
  end)

  it("takes a list of URLs in every endpoint, skipping a dead one", function()
    local list = { H.dead_url, urls[2], urls[3] }
    local client = H.client { url = list }
    finally(function() client:close() end)
    assert.are.equal("listed", client:remote_call("echo" .. S, { "listed" }))
    local args = { "--url", H.dead_url, "--url", urls[2], "--url", urls[3] }
    local function cli(words, opts)
      -- The URLs right after the command: run's options end at its script.
      local all = { words[1] }
      for _, w in ipairs(args) do all[#all + 1] = w end
      for i = 2, #words do all[#all + 1] = words[i] end
      return H.cli(all, opts)
    end
    local res = cli { "call", "echo" .. S, '"from call"' }
    assert.are.equal(0, res.code, res.stderr)
    assert.are.equal('"from call"', res.stdout:match("^%s*(.-)%s*$"))
    local script = H.tmpname("script") .. ".lua"
    H.write_file(script, ("local rabi = require 'rabibridge'\n"
      .. "print(rabi.client():connect():remote_call(%q, { 'from run' }))\n"):format("echo" .. S))
    res = cli { "run", script }
    assert.are.equal(0, res.code, res.stderr)
    assert.matches("from run", res.stdout, 1, true)
    res = cli({ "repl" }, { stdin = ("client.fn.%s('from repl')\n"):format("echo" .. S) })
    assert.are.equal(0, res.code, res.stderr)
    assert.matches("from repl", res.stdout, 1, true)
    -- A list that is not one is refused with its place named.
    local err = H.catch(function() H.rabi().client { url = { urls[1], 42 } } end)
    assert.are.equal("invalid_argument", err.kind)
    assert.matches("url: item 2 is not a URL string", err.message, 1, true)
  end)

  it("spreads clients over the nodes, each starting at a random one", function()
    local clients, seen = {}, {}
    finally(function() for _, c in ipairs(clients) do c:close() end end)
    for i = 1, 12 do
      clients[i] = H.client { url = urls, connection_name = ("spread %s %d"):format(S, i) }
    end
    local conns = C.connections()
    for i = 1, 12 do
      local nodes = conns[("spread %s %d"):format(S, i)]
      assert.are.equal(1, #(nodes or {}), "client " .. i .. " is not connected once")
      seen[nodes[1]] = (seen[nodes[1]] or 0) + 1
    end
    -- All twelve on one node by chance: 3 in 3^12.
    local used = 0
    for _ in pairs(seen) do used = used + 1 end
    assert.is_true(used >= 2, "every client is on one node")
  end)

  it("keeps every request when the node of the queue's leader dies", function()
    local q = "rpc_async_slow" .. S
    local leader = C.leader_of(q)
    -- The client is on the other two nodes, so that what this measures is
    -- the queue: requests waiting in it (40 loops, 12 served at a time)
    -- must outlive its leader.
    local others = {}
    for n = 1, 3 do
      if n ~= leader then others[#others + 1] = urls[n] end
    end
    local client = H.client { url = others }
    finally(function() client:close() end)
    local st, gap = kill_under_load(client, "leader's node %d killed", "slow" .. S, q, leader)
    assert_all_answered(st)
    assert.is_true(gap < 10, ("no call answered for %.1f s"):format(gap))
  end)

  -- The node a client's connection (by its name) is on, once it has one.
  local function client_node(cname)
    local nodes = H.wait_until(function() return C.connections()[cname] end, 10)
    assert(nodes and #nodes == 1, "client " .. cname .. " has no single connection")
    return nodes[1]
  end

  it("loses no call when a node holding only a follower dies, nor when the client's node does", function()
    local q = "rpc_async_slow" .. S
    local cname = "failover client " .. S
    local client = H.client { url = urls, connection_name = cname }
    finally(function() client:close() end)

    -- A follower's node that the client is not on.
    local leader, mine = C.leader_of(q), client_node(cname)
    local follower
    for n = 1, 3 do
      if n ~= leader and n ~= mine then follower = n end
    end
    local st, gap = kill_under_load(client, "follower-only node %d killed", "slow" .. S, q, follower)
    assert_all_answered(st)
    assert.is_true(gap < 10, ("no call answered for %.1f s"):format(gap))

    -- The client's own node (the leader's too, or not: the next test
    -- makes sure of the leader's): the calls it had out fail at once with
    -- a connection error (their replies would go to a reply queue that
    -- died with it); it reconnects to another node, with a new reply queue.
    mine = client_node(cname)
    local reply_queue = client._core:reply_queue()
    st, gap = kill_under_load(client, "the client's node %d killed", "slow" .. S, q, mine)
    local now_on = client_node(cname)
    assert.are.equal(0, st.unanswered)
    assert.are.equal(0, st.wrong)
    -- connection for the calls the broker had accepted, not_accepted for
    -- those it had not confirmed yet: each a clear error at once.
    for kind in pairs(st.failed) do
      assert.is_true(kind == "connection" or kind == "not_accepted", kind .. ": " .. st.messages[kind])
    end
    assert.is_true(gap < 10, ("no call answered for %.1f s"):format(gap))
    assert.are_not.equal(mine, now_on)
    assert.are_not.equal(reply_queue, client._core:reply_queue())
    assert.are.equal("after", client:remote_call("echo" .. S, { "after" }))
  end)

  it("loses no call when the client's node is also the queue leader's", function()
    -- The client reconnects within a tenth of a second, while the queue is
    -- electing a new leader: RabbitMQ 3.10 nacks every publish of a channel
    -- that first published to the queue then, for as long as the channel
    -- lives. The client sends them again on a fresh channel.
    local q = "rpc_async_slow" .. S
    local leader = C.leader_of(q)
    -- Clients start at a random node: of a few batches of eight, keep one
    -- that started at the leader's.
    local client, cname, mine
    for batch = 1, 5 do
      local made = {}
      for i = 1, 8 do
        local name = ("leader's client %s %d.%d"):format(S, batch, i)
        made[name] = H.client { url = urls, connection_name = name }
      end
      local conns = H.wait_until(function()
        local all = C.connections()
        for name in pairs(made) do
          if not all[name] then return nil end
        end
        return all
      end, 10)
      for name, c in pairs(made) do
        if not client and conns and conns[name][1] == leader then
          client, cname, mine = c, name, leader
        else
          c:close()
        end
      end
      if client then break end
    end
    assert(client, "no client connected to the leader's node")
    finally(function() client:close() end)
    local st, gap = kill_under_load(client, "the client's and the leader's node %d killed", "slow" .. S, q, mine)
    assert.are.equal(0, st.unanswered)
    assert.are.equal(0, st.wrong)
    for kind in pairs(st.failed) do
      assert.is_true(kind == "connection" or kind == "not_accepted" or kind == "queue_full",
        kind .. ": " .. st.messages[kind])
    end
    -- Refused publishes are sent again, not failed by the thousand: at
    -- most a few rounds of the 40 loops end queue_full.
    assert.is_true((st.failed.queue_full or 0) <= 120, ("%d calls failed queue_full"):format(st.failed.queue_full or 0))
    assert.is_true(gap < 5, ("no call answered for %.1f s"):format(gap))
    assert.are_not.equal(mine, client_node(cname))
    assert.are.equal("after", client:remote_call("echo" .. S, { "after" }))
  end)

  it("ends a poison request on a quorum queue at its delivery limit, while echo goes on", function()
    local client = H.client { url = urls, timeout = 60 }
    finally(function() client:close() end)
    local st, stop = call_loop(client, "echo" .. S, 4)
    -- poison kills the worker that runs it; its delivery_limit is 2.
    local err = H.expect_error("remote", client.remote_call, client, "poison" .. S, {}, nil, nil, { timeout = 60 })
    stop()
    report("echo beside a poison request", st, 0)
    -- the watchdog counts the two deaths (the broker's delivery count is
    -- only its backstop, with room for requeues after lost connections)
    assert.matches("was not run again: its worker died while running it 2 times", err.message, 1, true)
    assert.are.equal(0, st.unanswered)
    assert.are.same({}, st.failed)
    assert.is_true(st.answered > 0)
    assert.matches("poison" .. S .. ": answering cid %d+ with an error instead of running it", host:log())
    local log = host:log()
    -- one restart per death (the watchdog's own line on each death also
    -- names the exit status)
    assert.are.equal(2, select(2, log:gsub("exited with status 7; restarting", "")), log)
  end)

  it("ends a request on a quorum queue by the broker's delivery count when no worker dies", function()
    -- Each time `hang` runs, its worker's connection is closed under it: the
    -- request goes back to the queue unacked, and no worker died, so only
    -- x-delivery-count counts. delivery_limit 1 plus 3 for lost
    -- connections: it runs 4 times, and its 5th delivery is answered.
    local client = H.client { url = urls, timeout = 90 }
    finally(function() client:close() end)
    local rabi = H.rabi()
    local started = function() return select(2, host:log():gsub("spec hang started", "")) end
    local before = started()
    local call = rabi.spawn(function()
      return client:try_remote_call("hang" .. S, {}, nil, nil, { timeout = 90 })
    end)
    for round = 1, 4 do
      assert.is_truthy(H.wait_until(function() return started() >= before + round end, 20),
        ("hang did not start a %d. time:\n%s"):format(round, host:log()))
      assert.is_true(C.close_connections("rabihost worker") >= 1, "no worker connection to close")
    end
    local _, ok, code, res = rabi.wait(call)
    assert.is_true(ok, tostring(res))
    assert.are.equal(1, code, "the request was answered as if it had run: " .. tostring(res))
    assert.matches("was not run again: delivered 4 times without an answer", tostring(res), 1, true)
    assert.are.equal(before + 4, started(), "hang ran again after its delivery limit")
  end)
end)

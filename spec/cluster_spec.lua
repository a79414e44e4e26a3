-- The local three-node cluster (issue 13, scripts/cluster.sh) that the
-- suite starts for specs tagged #cluster: one cluster, queues replicated
-- across it, a node killed and revived, and a stop that leaves nothing.
--
-- The cluster's environment: see spec/cluster_helper.lua.
--
-- The last test stops the cluster and starts it again on the same ports,
-- so spec files after this one find it as they expect.
local H = require "helper"
local C = require "cluster_helper"

local urls, dir = C.urls, C.dir
local port_of, cluster_sh, ctl, raw, reachable, node_name = C.port_of, C.sh, C.ctl, C.raw, C.reachable, C.node_name
local cluster = C.ctl_prefix

-- Node n's view: { running = {name = true}, disk = {name = true}, nrunning = }
local function cluster_status(n)
  local st = C.ctl_json(n, "cluster_status")
  local view = { running = {}, disk = {}, nrunning = #st.running_nodes, ndisk = #st.disk_nodes }
  for _, name in ipairs(st.running_nodes) do view.running[name] = true end
  for _, name in ipairs(st.disk_nodes) do view.disk[name] = true end
  return view
end

-- Whether process pid runs (a zombie has ended: it only waits for its
-- parent to reap it).
local function alive(pid)
  local stat = H.read_file("/proc/" .. pid .. "/stat")
  return stat ~= nil and stat:match("^%d+ %b() (%a)") ~= "Z"
end

-- The loopback ports something listens on. -> { [port] = true }
local function listening()
  local ports = {}
  for p in H.run("ss -ltnH").stdout:gmatch("127%.0%.0%.1:(%d+)") do ports[tonumber(p)] = true end
  return ports
end

describe("the local cluster #cluster", function()
  local names

  setup(function()
    C.require_cluster()
    names = { node_name(1), node_name(2), node_name(3) }
  end)

  it("runs three nodes on their own ports, in one cluster", function()
    local res = cluster_sh("status")
    assert.are.equal(0, res.code, res.stdout .. res.stderr)
    local seen = {}
    for n = 1, 3 do
      assert.is_true(reachable(n), "node " .. n .. " takes no AMQP connection")
      seen[port_of(urls[n])] = true
      -- Each node sees all three, running, as members of its cluster.
      local view = cluster_status(n)
      assert.are.equal(3, view.nrunning, "node " .. n .. " runs with " .. view.nrunning .. " nodes")
      assert.are.equal(3, view.ndisk)
      for m = 1, 3 do
        assert.is_true(view.running[names[m]], ("node %d does not see node %d running"):format(n, m))
      end
    end
    local distinct = 0
    for _ in pairs(seen) do distinct = distinct + 1 end
    assert.are.equal(3, distinct)
    -- Registered with the cluster's own epmd, not the shared one on 4369
    -- (where a system broker's node would meet them).
    local cstate = assert(H.read_file(dir .. "/state"))
    local private = H.run(("env ERL_EPMD_PORT=%s epmd -names"):format(cstate:match("epmd_port=(%d+)"))).stdout
    local shared = H.run("env -u ERL_EPMD_PORT epmd -names").stdout
    for m = 1, 3 do
      local short = names[m]:match("^([^@]+)")
      assert.is_truthy(private:find("name " .. short .. " ", 1, true), "not in the cluster's epmd: " .. private)
      assert.is_nil(shared:find(short, 1, true), "in the shared epmd: " .. shared)
    end
  end)

  it("shows a quorum queue declared through node 1 on node 3, with a member on every node", function()
    local q = "cluster_spec_q_" .. H.random_hex(4)
    assert.are.equal(4, (raw("exists", urls[3], q)), "a queue nobody declared exists")
    assert.are.equal(0, (raw("declare-quorum", urls[1], q)))
    finally(function() raw("delete", urls[1], q) end)
    assert.are.equal(0, (raw("exists", urls[3], q)))
    local info = C.queue(q, 3, "name type members")
    assert.is_truthy(info, "node 3 does not list " .. q)
    assert.are.equal("quorum", info.type)
    table.sort(info.members)
    local want = { names[1], names[2], names[3] }
    table.sort(want)
    assert.are.same(want, info.members)
    -- A message published through node 1 is taken through node 3.
    assert.are.equal(0, (raw("publish", urls[1], q, "across")))
    local code, body = raw("get", urls[3], q)
    assert.are.equal(0, code)
    assert.are.equal("across", body)
  end)

  it("kills a node (it goes unreachable, the others go on) and revives it into the cluster", function()
    local q = "cluster_spec_k_" .. H.random_hex(4)
    assert.are.equal(0, (raw("declare-quorum", urls[1], q)))
    finally(function() raw("delete", urls[1], q) end)

    local pid = tonumber(H.read_file(dir .. "/n2/pid"))
    local res = cluster_sh("kill 2")
    assert.are.equal(0, res.code, res.stderr)
    assert.is_false(alive(pid), "node 2's VM still runs after kill")
    assert.is_false(reachable(2), "node 2 still takes connections")
    res = cluster_sh("status")
    assert.are.equal(1, res.code, "status says all run: " .. res.stdout)
    assert.is_truthy(res.stdout:find("node 2: down", 1, true), res.stdout)
    -- Node 1 has seen it go, and still counts it a member.
    local view = H.wait_until(function()
      local v = cluster_status(1)
      return v.nrunning == 2 and v
    end, 15)
    assert.is_truthy(view, "node 1 still sees node 2 running")
    assert.is_nil(view.running[names[2]])
    assert.is_true(view.disk[names[2]])
    -- Two of three members are a majority: the queue takes and gives.
    assert.are.equal(0, (raw("publish", urls[3], q, "while 2 was down")))

    local t0 = H.now()
    res = cluster_sh("revive 2")
    assert.are.equal(0, res.code, res.stderr)
    print(("\n  node 2 revived in %.1f s"):format(H.now() - t0))
    assert.is_true(reachable(2))
    for _, n in ipairs({ 1, 2 }) do
      view = H.wait_until(function()
        local v = cluster_status(n)
        return v.nrunning == 3 and v
      end, 15)
      assert.is_truthy(view, "node " .. n .. " does not see all three running after revive")
    end
    -- The revived node kept its data: it serves the queue's message.
    local code, body = raw("get", urls[2], q)
    assert.are.equal(0, code)
    assert.are.equal("while 2 was down", body)
  end)

  it("stops without leaving a process or a port, and starts again on the same ports", function()
    local cstate = assert(H.read_file(dir .. "/state"))
    local ports = { tonumber(cstate:match("epmd_port=(%d+)")) }
    local pids = {}
    for n = 1, 3 do
      ports[#ports + 1] = port_of(urls[n])
      local state = assert(H.read_file(("%s/n%d/state"):format(dir, n)))
      ports[#ports + 1] = tonumber(state:match("dist_port=(%d+)"))
      pids[#pids + 1] = tonumber(H.read_file(("%s/n%d/pid"):format(dir, n)))
    end
    -- The cluster's epmd, found by its port.
    local epmd = H.run(("ss -ltnpH 'sport = :%d'"):format(ports[1])).stdout:match("pid=(%d+)")
    assert.is_truthy(epmd, "nothing listens on the cluster's epmd port " .. ports[1])
    pids[#pids + 1] = tonumber(epmd)
    local before = listening()
    for _, p in ipairs(ports) do assert.is_true(before[p], "nothing listens on " .. p) end

    local res = cluster_sh("stop")
    finally(function()
      -- Back as the other #cluster specs expect it: the same URLs.
      local again = H.run(("RABIBRIDGE_CLUSTER_PORTS=%s %s start"):format(
        H.quote(("%d %d %d"):format(port_of(urls[1]), port_of(urls[2]), port_of(urls[3]))), cluster))
      assert(again.code == 0, "the cluster did not start again: " .. again.stderr)
    end)
    assert.are.equal(0, res.code, res.stderr)
    assert.are_not.equal(0, cluster_sh("status").code)
    for _, pid in ipairs(pids) do
      assert.is_false(alive(pid), "process " .. pid .. " outlived stop")
    end
    local after = listening()
    for _, p in ipairs(ports) do assert.is_nil(after[p], "port " .. p .. " still listens after stop") end
    -- No process of ours at all: every node's command line names its folder.
    for pid in H.run("ls /proc").stdout:gmatch("%d+") do
      local cmdline = H.read_file("/proc/" .. pid .. "/cmdline") or ""
      assert.is_false(alive(pid) and cmdline:find(dir, 1, true) ~= nil,
        "process " .. pid .. " outlived stop: " .. cmdline)
    end
    for n = 1, 3 do assert.is_false(reachable(n)) end
  end)
end)

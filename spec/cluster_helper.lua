-- The spec cluster, as spec/cluster_spec.lua and spec/failover_spec.lua
-- see it: its URLs, its nodes by number (1, 2, 3), rabbitmqctl against one
-- of them, and which node holds a queue's leader or a connection.
--
-- Environment (scripts/test.sh sets them when a #cluster spec runs):
--   RABIBRIDGE_CLUSTER_URLS  the AMQP URLs of nodes 1, 2, 3, space-separated
--   RABIBRIDGE_CLUSTER_CTL   a command prefix running scripts/cluster.sh
--                            against that cluster (kill N, revive N, ctl N ...)
--   RABIBRIDGE_CLUSTER_DIR   its state folder
-- Against a cluster of your own: `make cluster`, then
--   RABIBRIDGE_CLUSTER_URLS="$(scripts/cluster.sh url)" RABIBRIDGE_CLUSTER_DIR=build/cluster \
--   RABIBRIDGE_CLUSTER_CTL=scripts/cluster.sh scripts/test.sh spec/failover_spec.lua
local H = require "helper"
local cjson = require "cjson"

local C = {}

C.urls = {}
for u in (os.getenv("RABIBRIDGE_CLUSTER_URLS") or ""):gmatch("%S+") do C.urls[#C.urls + 1] = u end
C.ctl_prefix = os.getenv("RABIBRIDGE_CLUSTER_CTL")
C.dir = os.getenv("RABIBRIDGE_CLUSTER_DIR")

-- Raises unless the suite started a cluster: a #cluster spec's setup.
function C.require_cluster()
  assert(#C.urls == 3 and C.ctl_prefix and C.dir,
    "no cluster: RABIBRIDGE_CLUSTER_URLS/CTL/DIR are unset (scripts/test.sh starts one for #cluster specs)")
end

function C.port_of(url) return tonumber(url:match(":(%d+)/?$")) end

-- scripts/cluster.sh ARGS. -> as H.run
function C.sh(args) return H.run(C.ctl_prefix .. " " .. args) end

-- rabbitmqctl ARGS against node n. -> stdout (raises on failure)
function C.ctl(n, args)
  local res = C.sh(("ctl %d -q %s"):format(n, args))
  if res.code ~= 0 then
    error(("rabbitmqctl %s on node %d failed (%s): %s%s"):format(args, n, tostring(res.code), res.stdout,
      res.stderr), 2)
  end
  return res.stdout
end

-- rabbitmqctl ARGS --formatter json against node n, decoded.
function C.ctl_json(n, args) return cjson.decode(C.ctl(n, args .. " --formatter json")) end

-- spec/tools/cluster_raw.py CMD URL ARGS... -> exit code, stdout, stderr
function C.raw(cmd, url, ...)
  local words = { H.python, "spec/tools/cluster_raw.py", cmd, url }
  for _, a in ipairs({ ... }) do words[#words + 1] = a end
  local res = H.run(words)
  return res.code, res.stdout, res.stderr
end

function C.reachable(n) return C.raw("reachable", C.urls[n]) == 0 end

-- Node n's name, from the state scripts/cluster.sh keeps per node.
function C.node_name(n)
  local state = assert(H.read_file(("%s/n%d/state"):format(C.dir, n)), "no state for node " .. n)
  return state:match("node=(%S+)")
end

-- The number of the node named name (nil for none of ours).
function C.node_number(name)
  for n = 1, 3 do
    if C.node_name(n) == name then return n end
  end
end

-- The number of the node whose AMQP port is port.
function C.node_of_port(port)
  for n, u in ipairs(C.urls) do
    if C.port_of(u) == port then return n end
  end
end

-- A node that runs, other than those in `except` ({ [n] = true }).
function C.running_node(except)
  for n = 1, 3 do
    if not (except or {})[n] and C.reachable(n) then return n end
  end
end

-- Queue name's row of list_queues, with the given columns (default: name
-- type leader members online), asked of node via or a running one. -> row | nil
function C.queue(name, via, columns)
  columns = columns or "name type leader members online"
  for _, row in ipairs(C.ctl_json(via or C.running_node(), "list_queues " .. columns)) do
    if row.name == name then return row end
  end
end

-- The node holding queue name's leader.
function C.leader_of(name, via)
  local row = assert(C.queue(name, via), "no queue " .. name)
  return C.node_number(row.leader)
end

-- Whether every member of queue name is online (a revived node caught up).
function C.all_online(name, via)
  local row = C.queue(name, via)
  return row ~= nil and #row.online == 3
end

-- Connection name -> { node numbers of the connections of that name }.
function C.connections(via)
  local out = {}
  for _, row in ipairs(C.ctl_json(via or C.running_node(), "list_connections port client_properties")) do
    for _, prop in ipairs(row.client_properties) do
      if prop[1] == "connection_name" then
        local list = out[prop[3]] or {}
        list[#list + 1] = C.node_of_port(row.port)
        out[prop[3]] = list
      end
    end
  end
  return out
end

-- Closes every connection whose name starts with prefix, as an operator's
-- `rabbitmqctl close_connection` does. The pids come from the plain table:
-- close_connection does not take the JSON formatter's #PID<...>; the names
-- are matched to them by the client's port. -> how many it closed
function C.close_connections(prefix, via)
  via = via or C.running_node()
  local names = {}
  for _, row in ipairs(C.ctl_json(via, "list_connections peer_port client_properties")) do
    for _, prop in ipairs(row.client_properties) do
      if prop[1] == "connection_name" then names[row.peer_port] = tostring(prop[3]) end
    end
  end
  local closed = 0
  for pid, port in C.ctl(via, "list_connections --no-table-headers pid peer_port"):gmatch("(<[^>]+>)%s+(%d+)") do
    local name = names[tonumber(port)]
    if name and name:sub(1, #prefix) == prefix then
      C.ctl(via, ("close_connection '%s' 'spec: connection closed'"):format(pid))
      closed = closed + 1
    end
  end
  return closed
end

-- Kills node n (SIGKILL, a crash), and starts it again with its data.
function C.kill(n)
  local res = C.sh("kill " .. n)
  assert(res.code == 0, "cluster.sh kill " .. n .. ": " .. res.stderr)
end

function C.revive(n)
  local res = C.sh("revive " .. n)
  assert(res.code == 0, "cluster.sh revive " .. n .. ": " .. res.stderr)
end

return C

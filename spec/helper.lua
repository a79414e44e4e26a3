-- Shared machinery of the specs: real rabihost processes on a real broker.
--
-- Environment (scripts/test.sh sets both):
--   RABIBRIDGE_URL  the broker the suite runs against
--   RABIBRIDGE_CTL  a command prefix running rabbitmqctl against that node
-- Unset, both point at the development broker on 127.0.0.1:5690. H.broker
-- is that broker as an object; a spec that stops or restarts a broker, or
-- needs another listener, starts its own with H.Broker.start_private and
-- passes it (broker = b) to H.start, H.client, H.run and H.cli.
--
-- Every function a fixture registers carries a random suffix (the fixture
-- reads it from RABI_SPEC_SUFFIX), fresh for every host started, so runs
-- and tests never meet each other's leftover queues.
local ffi = require "ffi"
local cjson = require "cjson"
local luassert = require "luassert"

local H = {}

pcall(ffi.cdef, [[
  int poll(void *fds, unsigned long nfds, int timeout);
  int kill(int pid, int sig);
  int getpid(void);
]])
pcall(ffi.cdef, [[
  struct rb_spec_timespec { long tv_sec; long tv_nsec; };
  int clock_gettime(int clk, struct rb_spec_timespec *ts);
]])

H.url = os.getenv("RABIBRIDGE_URL")
if not H.url or H.url == "" then H.url = "amqp://guest:guest@127.0.0.1:5690/" end
H.ctl_prefix = os.getenv("RABIBRIDGE_CTL")
if not H.ctl_prefix or H.ctl_prefix == "" then
  H.ctl_prefix = "HOME=/tmp/devbroker/home /usr/lib/rabbitmq/bin/rabbitmqctl -n dev@localhost"
end
H.python = "/usr/bin/python3" -- Debian's, where python3-aio-pika lives
-- make check-memory points this at a sanitizer build.
H.rabihost = os.getenv("RABIHOST") or "build/rabihost"
-- A port nothing listens on: connections to it are refused at once.
H.dead_url = "amqp://guest:guest@127.0.0.1:1/"

-- ---- time ----

local ts = ffi.new("struct rb_spec_timespec")
function H.now()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end

-- Sleeps without driving the rabibridge loop (see rabi.sleep for that).
function H.sleep(seconds)
  ffi.C.poll(nil, 0, math.floor(seconds * 1000 + 0.5))
end

local function poll_until(fn, timeout, interval, sleep)
  local deadline = H.now() + (timeout or 10)
  repeat
    local v = fn()
    if v then return v end
    sleep(interval or 0.05)
  until H.now() > deadline
  return fn()
end

-- Polls fn until it returns a true value; -> that value, or nil on timeout.
function H.wait_until(fn, timeout, interval)
  return poll_until(fn, timeout, interval, H.sleep)
end

-- Like H.wait_until, but the main thread sleeps with rabi.sleep, so that
-- tasks started with rabi.spawn (call loops) keep running meanwhile.
function H.drive_until(fn, timeout, interval)
  return poll_until(fn, timeout, interval, function(s) H.rabi().sleep(s) end)
end

-- ---- names and files ----

local function random_hex(nbytes)
  local f = assert(io.open("/dev/urandom", "rb"))
  local s = f:read(nbytes)
  f:close()
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end
H.random_hex = random_hex

function H.quote(s)
  s = tostring(s)
  if s:match("^[%w%-%./_=:,@+]+$") then return s end
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end
H.read_file = read_file

local function write_file(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end
H.write_file = write_file

-- The pid in a file written by `echo $! >FILE`, once the line is complete
-- (the file exists, empty, between the shell's open and its write).
local function read_pid(path)
  local s = read_file(path)
  return s and tonumber(s:match("^(%d+)\n"))
end

-- Signals pid only while it still runs a command containing `what`, so
-- that a pid the system has since given to another process is left alone.
local function signal_if(pid, what, sig)
  if not pid then return false end
  local cmdline = read_file("/proc/" .. pid .. "/cmdline")
  if not cmdline or not cmdline:find(what, 1, true) then return false end
  return ffi.C.kill(pid, sig) == 0
end
H.signal_if = signal_if

function H.exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

-- One folder per run of the suite (per busted process) for logs and files.
H.run_id = os.date("!%Y%m%dT%H%M%S") .. "-" .. random_hex(3)
H.tmp = "build/spec-tmp/" .. H.run_id
os.execute("mkdir -p " .. H.quote(H.tmp))
-- Folders of runs older than an hour go.
os.execute("find build/spec-tmp -mindepth 1 -maxdepth 1 -mmin +60 -exec rm -rf {} + 2>/dev/null")

local seq = 0
function H.tmpname(stem)
  seq = seq + 1
  return ("%s/%s-%d"):format(H.tmp, stem or "f", seq)
end

function H.new_suffix()
  return "_" .. random_hex(4)
end

-- ---- running commands ----

-- The `env ...` prefix of a command line: RABIBRIDGE_URL is url (the
-- suite's broker unless given), then env's variables (false unsets one).
local function env_prefix(env, url)
  local vars = { RABIBRIDGE_URL = url or H.url }
  for k, v in pairs(env or {}) do vars[k] = v end
  local unset, set = {}, {}
  for k, v in pairs(vars) do
    if v == false then unset[#unset + 1] = "-u " .. k -- false unsets it
    else set[#set + 1] = k .. "=" .. H.quote(v) end
  end
  table.sort(unset)
  table.sort(set)
  -- env takes its -u options before the assignments
  return "env " .. table.concat(unset, " ") .. " " .. table.concat(set, " ") .. " "
end

local function command_line(cmd)
  if type(cmd) == "string" then return cmd end
  local q = {}
  for i, a in ipairs(cmd) do q[i] = H.quote(a) end
  return table.concat(q, " ")
end

-- Runs a command and waits for it. cmd: a list of words (quoted here) or a
-- shell string. opts: { env = {K = V (false: unset)}, stdin = "text",
-- broker = b (RABIBRIDGE_URL; default H.broker) }.
-- -> { stdout =, stderr =, code =, elapsed = }
function H.run(cmd, opts)
  opts = opts or {}
  local base = H.tmpname("run")
  local input = "/dev/null"
  if opts.stdin then
    input = base .. ".in"
    write_file(input, opts.stdin)
  end
  local url = opts.broker and opts.broker.url
  local line = ("%s%s <%s >%s 2>%s; echo $?"):format(env_prefix(opts.env, url), command_line(cmd),
    H.quote(input), H.quote(base .. ".out"), H.quote(base .. ".err"))
  local t0 = H.now()
  local p = assert(io.popen(line, "r"))
  local status = p:read("*a")
  p:close()
  local res = {
    stdout = read_file(base .. ".out") or "",
    stderr = read_file(base .. ".err") or "",
    code = tonumber(status:match("(%d+)%s*$")),
    elapsed = H.now() - t0,
  }
  return res
end

-- build/rabihost ARGS... -> as H.run
function H.cli(args, opts)
  local cmd = { H.rabihost }
  for _, a in ipairs(args) do cmd[#cmd + 1] = a end
  return H.run(cmd, opts)
end

-- A shell script run in the background (a broker stopped or restarted
-- while the spec goes on calling). -> a function telling whether it has
-- ended, and the file holding its output
local background_jobs = {}
function H.background(script)
  local done_file = H.tmpname("bg") .. ".done"
  local line = ("( %s >%s 2>&1; touch %s ) >/dev/null 2>&1 </dev/null &"):format(
    "sh -c " .. H.quote(script), H.quote(done_file .. ".log"), H.quote(done_file))
  os.execute(line)
  local function ended() return H.exists(done_file) end
  background_jobs[#background_jobs + 1] = ended
  return ended, done_file .. ".log"
end

-- Waits (up to timeout seconds each) for every H.background job to end: a
-- teardown's, before it stops the brokers those jobs act on.
function H.wait_background(timeout)
  for _, ended in ipairs(background_jobs) do H.wait_until(ended, timeout or 40, 0.2) end
end

-- ---- brokers ----

-- A broker: .url, .port, and what a spec asks of it (rabbitmqctl, its
-- queues and connections, raw AMQP). H.broker is the suite's; a private one
-- (H.Broker.new{ dir = }) is also started, stopped and restarted here,
-- through scripts/broker.sh with its own state folder.
local Broker = {}
Broker.__index = Broker
H.Broker = Broker

-- The port of amqp://user:pass@host:port/vhost (nil when it names none).
local function port_of(url)
  local hostport = (url:match("^%a+://([^/]*)") or ""):gsub("^.*@", "")
  return tonumber(hostport:match(":(%d+)$"))
end

-- opts: { url =, ctl_prefix = } for a broker that runs already (the
-- suite's), or { dir = "build/x-broker", port = N (default: a free port at
-- the first start, kept for restarts), extra_conf = FILE (appended to its
-- rabbitmq.conf, e.g. a TLS listener) } for a private one, not started yet.
function Broker.new(opts)
  local self = setmetatable({ url = opts.url, dir = opts.dir, port = opts.port, extra_conf = opts.extra_conf },
    Broker)
  if self.url then self.port = port_of(self.url) end
  if self.dir then
    self.ctl_prefix = self:script("ctl")
  else
    self.ctl_prefix = assert(opts.ctl_prefix, "Broker.new: a broker without dir needs ctl_prefix")
  end
  return self
end

-- Broker.new(opts):start(): a private broker, running. -> the broker
function Broker.start_private(opts)
  local b = Broker.new(opts)
  b:start()
  return b
end

-- The shell command line `scripts/broker.sh CMD` for this private broker:
-- on its port once it has one, else ("start") on a free one.
function Broker:script(cmd)
  assert(self.dir, "only a private broker (Broker.new{ dir = }) has a scripts/broker.sh")
  local env = { RABIBRIDGE_BROKER_DIR = self.dir }
  if self.port then env.RABIBRIDGE_BROKER_PORT = tostring(self.port) end
  if self.extra_conf then env.RABIBRIDGE_BROKER_EXTRA_CONF = self.extra_conf end
  if cmd == "start" and not self.port then cmd = "start --free-port" end
  local w = {}
  for k, v in pairs(env) do w[#w + 1] = k .. "=" .. H.quote(v) end
  table.sort(w)
  return "env " .. table.concat(w, " ") .. " scripts/broker.sh " .. cmd
end

-- `start`, retried for a few seconds on a port of its own (one the old
-- node's sockets may still hold after a stop), as a shell command line.
function Broker:start_script()
  if not self.port then return self:script("start") end
  return ("for i in 1 2 3 4 5; do %s && break; sleep 1; done"):format(self:script("start"))
end

-- Takes the URL (and so the port) from broker.sh start's output. -> url or nil
function Broker:learn_url(output)
  local url = output:match("(amqp://%S+)")
  if url then self.url, self.port = url, port_of(url) end
  return url
end

-- Starts the private broker and waits until it is up. -> its url
function Broker:start()
  local res
  for _ = 1, self.port and 5 or 1 do
    res = H.run(self:script("start"))
    if res.code == 0 then break end
    H.sleep(1)
  end
  assert(res.code == 0, ("the broker in %s did not start: %s"):format(self.dir, res.stderr))
  return assert(self:learn_url(res.stdout), res.stdout)
end

-- Starts it in the background (it boots while the spec does other work);
-- wait_started collects it. -> a function telling whether the start has ended
function Broker:start_in_background()
  local ended, log = H.background(self:start_script())
  self.starting = { ended = ended, log = log }
  return ended
end

-- Waits for a start_in_background. -> its url (raises if it failed)
function Broker:wait_started(timeout)
  local s = assert(self.starting, "wait_started without start_in_background")
  local ended = H.wait_until(s.ended, timeout or 40, 0.2)
  local out = H.read_file(s.log) or ""
  assert(ended, ("the broker in %s did not start within %d s: %s"):format(self.dir, timeout or 40, out))
  self.starting = nil
  return assert(self:learn_url(out), ("the broker in %s did not start: %s"):format(self.dir, out))
end

-- Stops the private broker (after a start still under way in the
-- background, so that no node outlives the spec).
function Broker:stop()
  if self.starting then
    H.wait_until(self.starting.ended, 40, 0.2)
    self.starting = nil
  end
  local res = H.run(self:script("stop"))
  assert(res.code == 0, ("the broker in %s did not stop: %s"):format(self.dir, res.stderr))
end

function Broker:running()
  return H.run(self:script("status")).code == 0
end

-- Stop, then start on the same port, in the background after delay
-- seconds. -> stopped(), started() (each true once that step has ended),
-- and the file holding the job's output
function Broker:restart_in_background(delay)
  local stopped_file = H.tmpname("bg") .. ".stopped"
  local started, log = H.background(("sleep %s; %s >/dev/null; touch %s; %s"):format(
    tostring(delay or 0), self:script("stop"), H.quote(stopped_file), self:start_script()))
  return function() return H.exists(stopped_file) end, started, log
end

-- rabbitmqctl against this broker. -> stdout (raises on failure)
function Broker:ctl(args)
  local res = H.run(self.ctl_prefix .. " -q " .. args)
  if res.code ~= 0 then
    error(("rabbitmqctl %s failed (%s): %s%s"):format(args, tostring(res.code), res.stdout, res.stderr), 2)
  end
  return res.stdout
end

-- The broker's queues: name -> { arguments = {key = value}, durable =,
-- auto_delete =, messages_ready =, messages_unacknowledged =, consumers = }
function Broker:queues()
  local out = self:ctl("list_queues name arguments durable auto_delete messages_ready "
    .. "messages_unacknowledged consumers --formatter json")
  local list = cjson.decode(out)
  local byname = {}
  for _, q in ipairs(list) do
    local args = {}
    for _, a in ipairs(q.arguments or {}) do args[a[1]] = a[3] end
    q.arguments = args
    byname[q.name] = q
  end
  return byname
end

-- The broker's connections: { pid =, peer_port =, name = connection_name }
-- (pid as close_connection takes it: the JSON formatter's #PID<...> is not)
function Broker:connections()
  local names = {}
  for _, c in ipairs(cjson.decode(self:ctl("list_connections peer_port client_properties --formatter json"))) do
    for _, p in ipairs(c.client_properties or {}) do
      if p[1] == "connection_name" then names[c.peer_port] = p[3] end
    end
  end
  local list = {}
  for pid, port in self:ctl("list_connections --no-table-headers pid peer_port"):gmatch("(<[^>]+>)%s+(%d+)") do
    list[#list + 1] = { pid = pid, peer_port = tonumber(port), name = names[tonumber(port)] }
  end
  return list
end

-- The local ports of the process pid's TCP connections to this broker.
function Broker:ports_of(pid)
  local res = H.run("ss -tnpH state established")
  local ports = {}
  for line in res.stdout:gmatch("[^\n]+") do
    if line:find("pid=" .. pid .. ",", 1, true) then
      local lport, rport = line:match("%S+:(%d+)%s+%S+:(%d+)")
      if tonumber(rport) == self.port then ports[#ports + 1] = tonumber(lport) end
    end
  end
  return ports
end

-- Makes the broker close a connection, as a broker restart or a network
-- failure would.
function Broker:close_connection(conn_pid, reason)
  self:ctl(("close_connection %s %s"):format(H.quote(conn_pid), H.quote(reason or "closed by the spec suite")))
end

-- ---- raw AMQP (spec/tools/amqp_raw.py) ----

-- Publishes raw bodies to the rpc exchange and collects the replies.
-- cases: { { routing_key =, body =, reply_to = true|false } }
-- -> one result per case: { replied =, body =, returned = }
function Broker:raw_publish(cases, wait)
  local list = {}
  for i, c in ipairs(cases) do
    list[i] = {
      routing_key = c.routing_key,
      body_hex = (c.body:gsub(".", function(ch) return ("%02x"):format(ch:byte()) end)),
      reply_to = c.reply_to ~= false,
      correlation_id = tostring(1000 + i),
    }
  end
  local res = H.run({ H.python, "spec/tools/amqp_raw.py", "publish", self.url, tostring(wait or 5) },
    { stdin = cjson.encode(list), broker = self })
  if res.code ~= 0 then error("amqp_raw.py publish failed: " .. res.stderr, 2) end
  local out = cjson.decode(res.stdout)
  for _, r in ipairs(out) do
    if r.body_hex ~= cjson.null then
      r.body = r.body_hex:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end)
    else
      r.body = nil
    end
  end
  return out
end

-- Starts a foreign (Python) server for one request on routing key rk.
-- -> handle with :result() (waits for the captured request) and :stop()
function Broker:raw_serve_once(queue, rk, reply_bytes, timeout)
  local out = H.tmpname("serve-once") .. ".json"
  local hex = reply_bytes:gsub(".", function(ch) return ("%02x"):format(ch:byte()) end)
  local pidf = out .. ".pid"
  local line = ("( %s %s spec/tools/amqp_raw.py serve-once %s %s %s %s %s %s >%s 2>&1 & echo $! >%s ) </dev/null"):format(
    env_prefix(nil, self.url), H.python, H.quote(self.url), H.quote(queue), H.quote(rk), hex, H.quote(out),
    tostring(timeout or 20), H.quote(out .. ".log"), H.quote(pidf))
  os.execute(line)
  local pid = H.wait_until(function() return read_pid(pidf) end, 10)
  local ready = H.wait_until(function() return H.exists(out .. ".ready") end, 10)
  local handle = { pid = pid, file = out }
  function handle:stop()
    signal_if(self.pid, "amqp_raw.py", 15)
  end
  if not ready then
    handle:stop()
    error("the Python server did not start: " .. (read_file(out .. ".log") or ""), 2)
  end
  function handle:result(wait)
    -- amqp_raw.py renames the finished file into place
    local got = H.wait_until(function() return read_file(out) end, wait or 10)
    if not got then return nil, read_file(out .. ".log") end
    local r = cjson.decode(got)
    r.body = r.body_hex:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end)
    return r
  end
  return handle
end

-- The suite's broker, and the functions that act on it (the names specs
-- used before brokers were objects).
H.broker = Broker.new { url = H.url, ctl_prefix = H.ctl_prefix }
function H.ctl(args) return H.broker:ctl(args) end
function H.queues() return H.broker:queues() end
function H.connections() return H.broker:connections() end
function H.broker_ports_of(pid) return H.broker:ports_of(pid) end
function H.close_connection(conn_pid) return H.broker:close_connection(conn_pid) end
function H.raw_publish(cases, wait) return H.broker:raw_publish(cases, wait) end
function H.raw_serve_once(queue, rk, reply_bytes, timeout)
  return H.broker:raw_serve_once(queue, rk, reply_bytes, timeout)
end

-- ---- rabihost processes ----

local live = {} -- every host started and not yet reaped: pid -> handle

local Host = {}
Host.__index = Host

function Host:pid() return self._pid end
function Host:log() return read_file(self.logfile) or "" end
function Host:name(base) return base .. self.suffix end
function Host:alive() return signal_if(self._pid, "rabihost", 0) and not self:exited() end
function Host:exited() return (read_file(self.rcfile) or ""):match("^%d+\n") ~= nil end

-- How many times the log matches a Lua pattern.
function Host:log_count(pattern)
  local n = 0
  for _ in self:log():gmatch(pattern) do n = n + 1 end
  return n
end

-- The pids of the workers that have said they serve, in the log's order.
-- With want, waits (up to 15 s) until that many have: start() returns once
-- the first worker serves, and the others may still be connecting.
function Host:worker_pids(want)
  local function serving()
    local pids = {}
    for pid in self:log():gmatch("%[(%d+) w%d+%] serving %d") do pids[#pids + 1] = tonumber(pid) end
    return pids
  end
  if want then H.wait_until(function() return #serving() >= want end, 15) end
  return serving()
end

-- -> the exit code once the process has exited within timeout, else nil
function Host:wait_exit(timeout)
  local ok = H.wait_until(function() return self:exited() end, timeout or 15)
  if not ok then return nil end
  live[self._pid] = nil
  return tonumber(read_file(self.rcfile):match("(%d+)"))
end

local SIGNALS = { HUP = 1, INT = 2, KILL = 9, TERM = 15, USR1 = 10 }
function Host:kill(sig)
  local n = type(sig) == "number" and sig or SIGNALS[sig or "TERM"]
  signal_if(self._pid, "rabihost", n)
end

-- SIGTERM, wait for the exit (SIGKILL after timeout). -> exit code
function Host:stop(timeout)
  if not self._pid or self:exited() then return self:wait_exit(0) end
  self:kill("TERM")
  local code = self:wait_exit(timeout or 15)
  if code == nil then
    self:kill("KILL")
    -- The workers (pids from the log) go too.
    for pid in self:log():gmatch("%[(%d+) w%d+%]") do signal_if(tonumber(pid), "rabihost", 9) end
    code = self:wait_exit(5)
  end
  live[self._pid] = nil
  return code
end

-- Starts `rabihost serve` and waits until it logs "serving N functions".
-- opts: { dir = "spec/fixtures/x" or { ... }, args = { flags... },
--         env = { K = V }, suffix = "_abc", wait = true, functions = N,
--         timeout = 20, broker = b (its RABIBRIDGE_URL; default H.broker) }
-- -> handle (:stop(), :kill(sig), :log(), :pid(), :name(base), :wait_exit(),
--    .suffix, .broker)
function H.start(opts)
  opts = opts or {}
  local suffix = opts.suffix or H.new_suffix()
  local base = H.tmpname("host")
  local self = setmetatable({
    suffix = suffix, logfile = base .. ".log", rcfile = base .. ".rc", pidfile = base .. ".pid",
    broker = opts.broker or H.broker,
  }, Host)
  local words = { H.rabihost, "serve" }
  local dirs = type(opts.dir) == "table" and opts.dir or { opts.dir or "spec/fixtures/basic" }
  for _, d in ipairs(dirs) do words[#words + 1] = d end
  -- Short drains keep teardown quick; a test that wants more says so.
  local args = opts.args or {}
  local has_drain = false
  for _, a in ipairs(args) do
    words[#words + 1] = a
    if a:match("^%-%-drain%-timeout") then has_drain = true end
  end
  if not has_drain then words[#words + 1] = "--drain-timeout=5" end
  local env = { RABI_SPEC_SUFFIX = suffix }
  for k, v in pairs(opts.env or {}) do env[k] = v end
  -- The subshell records the exit code: the host is not our child.
  local line = ("( %s%s >%s 2>&1 </dev/null & echo $! >%s; wait $!; echo $? >%s ) >/dev/null 2>&1 </dev/null &")
    :format(env_prefix(env, self.broker.url), command_line(words), H.quote(self.logfile), H.quote(self.pidfile),
      H.quote(self.rcfile))
  os.execute(line)
  self._pid = H.wait_until(function() return read_pid(self.pidfile) end, 15)
  assert(self._pid, "rabihost did not start: " .. line)
  live[self._pid] = self
  if opts.wait == false then return self end
  local serving = H.wait_until(function()
    if self:exited() then return "exited" end
    return self:log():match("serving (%d+) functions?")
  end, opts.timeout or 20)
  if serving == "exited" or not serving then
    local log = self:log()
    self:stop(2)
    error(("rabihost %s did not start serving (%s):\n%s"):format(table.concat(dirs, " "),
      serving or "timed out", log), 2)
  end
  self.serving = tonumber(serving)
  if opts.functions and self.serving ~= opts.functions then
    local log = self:log()
    self:stop(2)
    error(("rabihost serves %d functions, expected %d:\n%s"):format(self.serving, opts.functions, log), 2)
  end
  return self
end

-- Stops every host still running (a teardown's safety net).
function H.stop_all()
  local hosts = {}
  for _, h in pairs(live) do hosts[#hosts + 1] = h end
  for _, h in ipairs(hosts) do pcall(h.stop, h, 10) end
end

-- ---- the client under test ----

local rabi
function H.rabi()
  if not rabi then
    rabi = require "rabibridge"
    -- The suite's own client logs only errors, so that busted's output stays
    -- readable; the hosts' logs are in their files.
    require("rabibridge.core").set_log_level("ERROR")
  end
  return rabi
end

-- A connected client (timeout 10 s unless given). opts: rabi.client's,
-- plus broker = b: its url (the suite's broker unless url or broker is given).
function H.client(opts)
  local r = H.rabi()
  local o = { timeout = 10 }
  for k, v in pairs(opts or {}) do o[k] = v end
  local broker = o.broker or H.broker
  o.broker = nil -- not an option of rabi.client
  o.url = o.url or broker.url
  return r.client(o):connect()
end

-- pcall that returns the error value (not a string) for error values.
function H.catch(fn, ...)
  local ok, err = pcall(fn, ...)
  if ok then return nil end
  return err
end

-- Values as a failure message shows them: strings quoted, error values by
-- their kind and message.
local function show(v)
  if type(v) == "string" then return ("%q"):format(v) end
  if type(v) == "table" and v.kind ~= nil then
    return ("error value {kind = %s, message = %s}"):format(show(v.kind), show(v.message))
  end
  return tostring(v)
end

local function pack(...) return { n = select("#", ...), ... } end

local function show_all(t, from, to)
  local parts = {}
  for i = from, to do parts[#parts + 1] = show(t[i]) end
  return #parts > 0 and table.concat(parts, ", ") or "nothing"
end

-- Calls fn(...) and expects it to raise an error value of kind `kind`.
-- Fails the test with what came back instead: no error and the values
-- returned, an error that is not an error value, or another kind and its
-- message. -> the error value, for more asserts
function H.expect_error(kind, fn, ...)
  local res = pack(pcall(fn, ...))
  local got, detail
  local err = res[2]
  if res[1] then
    got, detail = "no error", "returned " .. show_all(res, 2, res.n)
  elseif type(err) ~= "table" then
    got, detail = "a " .. type(err) .. " error", "raised " .. show(err)
  elseif err.kind ~= kind then
    got, detail = err.kind == nil and "a table without kind" or "kind " .. tostring(err.kind),
      "raised " .. show(err)
  else
    return err
  end
  -- luassert's failure (busted counts it as a failure, not an error); a
  -- tail call, so that it names the spec's line, not this one.
  return luassert.equal("kind " .. kind, got, ("expected an error of kind %s; the call %s"):format(kind, detail))
end

-- ---- the basic fixture: a host and a client connected to it ----

-- What most describe blocks start first, and stop last:
--
--   local fx = H.host_fixture()      -- spec/fixtures/basic, the suite's broker
--   local host, client
--   setup(function() host, client = fx:start() end)
--   teardown(function() fx:stop() end)
--
-- opts: those of H.start (dir, args, env, broker, ...), plus client = the
-- options of H.client (its broker is the host's unless given), or false
-- for a host alone. After :start(), .host, .client and .suffix are set.
local Fixture = {}
Fixture.__index = Fixture

function H.host_fixture(opts)
  return setmetatable({ opts = opts or {} }, Fixture)
end

-- Starts the host, then connects the client. -> host, client
function Fixture:start()
  local start_opts = {}
  for k, v in pairs(self.opts) do
    if k ~= "client" then start_opts[k] = v end
  end
  self.host = H.start(start_opts)
  self.suffix = self.host.suffix
  if self.opts.client ~= false then
    local client_opts = { broker = self.host.broker }
    for k, v in pairs(self.opts.client or {}) do client_opts[k] = v end
    self.client = H.client(client_opts)
  end
  return self.host, self.client
end

-- Closes the client, and stops the host with every other host still
-- running (those a test of the block left behind). A client that fails to
-- close fails the teardown, after the hosts have stopped.
function Fixture:stop()
  local ok, err = true, nil
  if self.client then ok, err = pcall(self.client.close, self.client) end
  H.stop_all()
  if not ok then error(err, 0) end
end

-- Runs fn(i) for i = 1..n side by side (rabi.spawn) and waits for each
-- with rabi.wait. -> results (each { ok =, value =, at = seconds from the
-- start to the task's end, measured in the task }), seconds until the last
-- task ended (so that timings measure the calls, not how soon the main
-- thread wakes up; client_spec.lua checks that separately).
function H.concurrently(n, fn)
  local r = H.rabi()
  local t0 = H.now()
  local tasks = {}
  local ended = {}
  for i = 1, n do
    tasks[i] = r.spawn(function()
      local res = { pcall(fn, i) }
      ended[i] = H.now() - t0
      if not res[1] then error(res[2], 0) end
      return unpack(res, 2)
    end)
  end
  local out, last = {}, 0
  for i, t in ipairs(tasks) do
    local ok, v = r.wait(t)
    out[i] = { ok = ok, value = v, at = ended[i] }
    if ended[i] and ended[i] > last then last = ended[i] end
  end
  return out, last
end

return H

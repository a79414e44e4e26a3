-- The operator's view (issue 12, points 2 and 3): /metrics in Prometheus's
-- text format for all workers together, /healthz, /readyz, and systemd's
-- notifications on a datagram socket the spec binds as NOTIFY_SOCKET.
local H = require "helper"
local ffi = require "ffi"

pcall(ffi.cdef, [[
  struct rb_spec_sockaddr_un { unsigned short sun_family; char sun_path[108]; };
  int socket(int domain, int type, int protocol);
  int bind(int fd, const void *addr, unsigned int len);
  long recv(int fd, void *buf, unsigned long len, int flags);
  int close(int fd);
]])

-- A datagram socket bound at a fresh path, as systemd's NOTIFY_SOCKET is.
local function notify_socket()
  local path = ("/tmp/rabihost-notify-%s.sock"):format(H.random_hex(6))
  local fd = ffi.C.socket(1, 2 + 2048, 0) -- AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK
  assert(fd >= 0, "socket() failed")
  local sa = ffi.new("struct rb_spec_sockaddr_un")
  sa.sun_family = 1
  ffi.copy(sa.sun_path, path)
  assert(ffi.C.bind(fd, sa, ffi.sizeof(sa)) == 0, "bind() failed")
  local got = {}
  local s = { path = path, messages = got }
  -- Reads what has arrived; -> every message so far, in order
  function s:read()
    local buf = ffi.new("char[4096]")
    while true do
      local n = ffi.C.recv(fd, buf, 4096, 0)
      if n <= 0 then break end
      got[#got + 1] = ffi.string(buf, n)
    end
    return got
  end
  function s:has(text)
    for _, m in ipairs(self:read()) do
      if m:find(text, 1, true) then return true end
    end
    return false
  end
  function s:close()
    ffi.C.close(fd)
    os.remove(path)
  end
  return s
end

local function http(port, path, method)
  local res = H.run { "curl", "-s", "-S", "-X", method or "GET", "-w", "\n%{http_code}",
    ("http://127.0.0.1:%d%s"):format(port, path) }
  local body, code = res.stdout:match("^(.*)\n(%d+)$")
  return tonumber(code), body or res.stdout .. res.stderr
end

local function port_of(host)
  local port = H.wait_until(function() return host:log():match("/metrics %(port (%d+)%)") end, 10)
  return assert(tonumber(port), "no metrics port in the log:\n" .. host:log())
end

-- Every sample of a scrape: "name{labels}" -> value.
local function scrape(port)
  local code, body = http(port, "/metrics")
  assert.equal(200, code, body)
  local samples = {}
  for line in body:gmatch("[^\n]+") do
    if not line:match("^#") then
      local key, value = line:match("^(%S+) (%S+)$")
      assert(key, "not a sample line: " .. line)
      samples[key] = tonumber(value) or (value == "+Inf" and math.huge)
    end
  end
  return samples, body
end

local function calls(samples, fn, outcome)
  return samples[('rabihost_calls_total{function="%s",ftype="async",outcome="%s"}'):format(fn, outcome)] or 0
end

describe("metrics and health", function()
  local host, client, rabi, port, sock, config
  local function N(base) return host:name(base) end

  setup(function()
    rabi = H.rabi()
    sock = notify_socket()
    -- From the config file: app.metrics and app.metrics_interval.
    config = H.tmpname("metrics-config") .. ".lua"
    local f = assert(io.open(config, "w"))
    f:write('app = { metrics = "127.0.0.1:0", metrics_interval = 0.3 }\n')
    f:close()
    host = H.start { dir = { "spec/fixtures/basic", "spec/fixtures/metrics" }, args = { "-w", "2", "-c", config },
                     env = { NOTIFY_SOCKET = sock.path } }
    client = H.client()
    port = port_of(host)
  end)

  teardown(function()
    if client then client:close() end
    if host then host:stop() end
    if sock then sock:close() end
    os.remove(config)
  end)

  it("tells systemd READY=1 once the workers consume", function()
    assert.is_true(H.wait_until(function() return sock:has("READY=1") end, 10), "no READY=1 on the socket")
    assert.is_false(sock:has("STOPPING=1"))
  end)

  it("/healthz says the supervisor is alive, /readyz that every worker serves", function()
    local code, body = http(port, "/healthz")
    assert.equal(200, code)
    assert.equal("ok\n", body)
    code, body = http(port, "/readyz")
    assert.equal(200, code, body)
    assert.matches("ready: 2 workers serving", body, 1, true)
  end)

  it("answers 404 elsewhere and 405 to other methods", function()
    assert.equal(404, (http(port, "/nothing")))
    assert.equal(405, (http(port, "/metrics", "POST")))
  end)

  it("counts each call by function and outcome, all workers together", function()
    local before = scrape(port)
    for i = 1, 3 do assert.equal(i + 1, client:remote_call(N("add"), { i, 1 })) end
    H.expect_error("remote", client.remote_call, client, N("add"), { 1, "x" }) -- invalid arguments
    H.expect_error("remote", client.remote_call, client, N("add"), {}, { c = 1 }) -- invalid arguments
    H.expect_error("remote", client.remote_call, client, N("fail"), { "metrics" })
    -- Not a request in either serialiser: refused.
    local raw = H.raw_publish { { routing_key = "async_" .. N("add"), body = "not a request" } }
    assert.is_true(raw[1].replied)
    -- busy holds its worker 1.5 s: each of these callers gives up after 1 s,
    -- before its answer (or before its request was even taken): expired.
    local results = H.concurrently(3, function()
      return client:remote_call(N("busy"), { 1.5 }, nil, nil, { timeout = 1 })
    end)
    for i, r in ipairs(results) do assert.is_false(r.ok, "call " .. i .. " was answered") end
    -- A service that calls another: 2 calls made as a client, both ok.
    assert.equal(1 + 4, client:remote_call(N("sum_sq"), { { 1, 2 } }))
    local after = H.wait_until(function()
      local s = scrape(port)
      return calls(s, N("busy"), "expired") - calls(before, N("busy"), "expired") == 3 and s
    end, 5)
    assert.is_table(after, "the expired calls were not counted")
    local function delta(fn, outcome) return calls(after, N(fn), outcome) - calls(before, N(fn), outcome) end
    assert.equal(3 + 2, delta("add", "ok")) -- sum_sq's two calls of add too
    assert.equal(2, delta("add", "invalid_arguments"))
    assert.equal(1, delta("add", "refused"))
    assert.equal(0, delta("add", "remote_error"))
    assert.equal(1, delta("fail", "remote_error"))
    assert.equal(0, delta("busy", "ok"))
    assert.equal(1, delta("sum_sq", "ok"))
    local function client_calls(s, outcome) return s[('rabihost_client_calls_total{outcome="%s"}'):format(outcome)] end
    assert.equal(2, client_calls(after, "ok") - client_calls(before, "ok"))
    -- The histogram saw every call of add that ran (5 + 2 + 1), and its buckets add up.
    local hist = ('rabihost_call_duration_seconds_%%s{function="%s",ftype="async"%%s}'):format(N("add"))
    assert.equal(8, after[hist:format("count", "")] - (before[hist:format("count", "")] or 0))
    assert.equal(after[hist:format("count", "")], after[hist:format("bucket", ',le="+Inf"')])
    assert.is_true(after[hist:format("sum", "")] > 0)
    assert.is_true(after[hist:format("bucket", ',le="0.001"')] <= after[hist:format("bucket", ',le="10"')])
  end)

  it("shows the calls in flight", function()
    local key = ('rabihost_calls_in_flight{function="%s",ftype="async"}'):format(N("sleep"))
    local t = rabi.spawn(function() return client:remote_call(N("sleep"), { 1.5 }) end)
    local seen = H.wait_until(function() return scrape(port)[key] == 1 end, 1.2, 0.1)
    assert.is_true(seen, "the call in flight was not shown")
    assert.is_true((rabi.wait(t)))
    assert.equal(0, scrape(port)[key])
  end)

  it("reports the queue's depth and consumers as the broker does", function()
    local consumers = ('rabihost_queue_consumers{function="%s",ftype="async"}'):format(N("slow1"))
    local messages = ('rabihost_queue_messages{function="%s",ftype="async"}'):format(N("slow1"))
    assert.equal(2, H.wait_until(function() return scrape(port)[consumers] end, 5))
    -- slow1: one call at a time per worker: two run, the third waits.
    local ts = {}
    for i = 1, 3 do ts[i] = rabi.spawn(function() return client:try_remote_call(N("slow1"), { 1.5 }) end) end
    local waiting = H.wait_until(function() return scrape(port)[messages] == 1 end, 1.4, 0.1)
    assert.is_true(waiting, "the waiting call was not reported")
    for i = 1, 3 do rabi.wait(ts[i]) end
    assert.is_true(H.wait_until(function() return scrape(port)[messages] == 0 end, 5))
  end)

  it("reports each worker: up, connected, serving, memory, restarts", function()
    local s = scrape(port)
    for w = 0, 1 do
      assert.equal(1, s[('rabihost_worker_up{worker="%d"}'):format(w)])
      assert.equal(1, s[('rabihost_worker_connected{worker="%d"}'):format(w)])
      assert.equal(1, s[('rabihost_worker_state{worker="%d",state="serving"}'):format(w)])
      assert.is_true(s[('rabihost_worker_resident_memory_bytes{worker="%d"}'):format(w)] > 1e6)
      assert.equal(0, s[('rabihost_worker_reconnects_total{worker="%d"}'):format(w)])
    end
    assert.equal(2, s.rabihost_workers)
    local restarts = 'rabihost_worker_restarts_total{worker="1"}'
    local before = s[restarts]
    local pid = tonumber(host:log():match("%[(%d+) w1%] serving"))
    ffi.C.kill(pid, 9)
    local after = H.wait_until(function()
      local now = scrape(port)
      return now[restarts] == before + 1 and now['rabihost_worker_up{worker="1"}'] == 1 and now
    end, 10)
    assert.is_table(after, "the restart was not counted")
    -- The counters survive the worker: its calls are still counted.
    assert.is_true(calls(after, N("add"), "ok") >= 3)
    assert.is_true(H.wait_until(function() return (http(port, "/readyz")) == 200 end, 10))
  end)

  it("passes promtool check metrics", function()
    local _, body = scrape(port)
    local res = H.run({ "promtool", "check", "metrics" }, { stdin = body })
    assert.equal(0, res.code, res.stdout .. res.stderr)
  end)

  it("tells systemd STOPPING=1 when it drains", function()
    host:stop()
    assert.is_true(H.wait_until(function() return sock:has("STOPPING=1") end, 5), "no STOPPING=1")
    host = nil
  end)
end)

describe("the systemd watchdog", function()
  -- WatchdogSec in the unit becomes WATCHDOG_USEC (and WATCHDOG_PID, the
  -- main pid) in the service's environment; the keep-alive goes out at half
  -- the interval, from the supervisor's loop.
  local function count(messages, text)
    local n = 0
    for _, m in ipairs(messages) do
      if m:find(text, 1, true) then n = n + 1 end
    end
    return n
  end

  local function run_for(seconds, env)
    local sock = notify_socket()
    env.NOTIFY_SOCKET = sock.path
    local host = H.start { dir = "spec/fixtures/basic", env = env }
    local ok, err = pcall(function()
      assert.is_true(H.wait_until(function() return sock:has("READY=1") end, 10), "no READY=1 on the socket")
    end)
    local before = count(sock:read(), "WATCHDOG=1")
    if ok then require("rabibridge").sleep(seconds) end
    local after = count(sock:read(), "WATCHDOG=1")
    host:stop()
    sock:close()
    assert(ok, err)
    return after - before, before
  end

  it("sends WATCHDOG=1 at half of WATCHDOG_USEC while it runs", function()
    -- 0.6 s asked: a keep-alive every 0.3 s, so about 7 in 2 s. Fewer than
    -- 4 would let systemd's watchdog fire on a healthy service.
    local sent = run_for(2, { WATCHDOG_USEC = "600000" })
    assert.is_true(sent >= 4, ("%d WATCHDOG=1 in 2 s with WATCHDOG_USEC=600000"):format(sent))
    assert.is_true(sent <= 10, ("%d WATCHDOG=1 in 2 s: more often than half the interval"):format(sent))
  end)

  it("sends none when systemd asks for none, or asks another pid", function()
    local sent, before = run_for(1, {})
    assert.equal(0, sent + before, "WATCHDOG=1 without WATCHDOG_USEC")
    sent, before = run_for(1, { WATCHDOG_USEC = "600000", WATCHDOG_PID = "1" })
    assert.equal(0, sent + before, "WATCHDOG=1 though WATCHDOG_PID names another process")
  end)
end)

describe("readiness when the broker goes away", function()
  local broker, host, port

  setup(function()
    broker = H.Broker.start_private { dir = "build/metrics-broker" }
    host = H.start { dir = "spec/fixtures/basic", broker = broker, args = { "--metrics", "127.0.0.1:0" } }
    port = port_of(host)
  end)

  teardown(function()
    if host then host:stop() end
    if broker then broker:stop() end
  end)

  it("/readyz is 503 while the broker is down, 200 once the worker is back; /healthz stays 200", function()
    assert.is_true(H.wait_until(function() return (http(port, "/readyz")) == 200 end, 5))
    broker:stop()
    local down = H.wait_until(function()
      local c, b = http(port, "/readyz")
      return c == 503 and b
    end, 10)
    assert.is_string(down, "/readyz stayed ready")
    assert.matches("worker 0: reconnecting", down, 1, true)
    assert.equal(200, (http(port, "/healthz")))
    local s = scrape(port)
    assert.equal(0, s['rabihost_worker_connected{worker="0"}'])
    assert.equal(1, s['rabihost_worker_state{worker="0",state="reconnecting"}'])
    broker:start()
    assert.is_true(H.wait_until(function() return (http(port, "/readyz")) == 200 end, 20),
      "not ready after the broker came back:\n" .. host:log())
    s = scrape(port)
    assert.equal(1, s['rabihost_worker_connected{worker="0"}'])
    assert.equal(1, s['rabihost_worker_reconnects_total{worker="0"}'])
  end)
end)

describe("--metrics", function()
  it("refuses what is not HOST:PORT, and a port it cannot listen on", function()
    local res = H.cli { "serve", "--metrics", "9100", "spec/fixtures/basic" }
    assert.equal(64, res.code, res.stderr)
    assert.matches("--metrics needs HOST:PORT", res.stderr, 1, true)
    res = H.cli { "serve", "--metrics", "192.0.2.1:9", "spec/fixtures/basic" } -- not an address of ours
    assert.equal(78, res.code, res.stderr)
    assert.matches("cannot listen on 192.0.2.1:9", res.stderr, 1, true)
  end)
end)

describe("examples/rabihost.service", function()
  it("is a Type=notify unit whose ExecStart rabihost accepts", function()
    local f = assert(io.open("examples/rabihost.service"))
    local unit = f:read("*a")
    f:close()
    assert.matches("\nType=notify\n", unit, 1, true)
    local exec = assert(unit:match("\nExecStart=(%S+ [^\n]+)"))
    local cli = require "rabibridge.cli"
    local words = {}
    for w in exec:gmatch("%S+") do words[#words + 1] = w end
    assert.equal("serve", words[2])
    local opts, paths = cli.parse(words, 3, cli.command_spec("serve"))
    assert.is_table(opts, tostring(paths))
    assert.equal("127.0.0.1:9464", opts.metrics)
    assert.same({ "/etc/rabihost/services" }, paths)
    -- systemd's own check, on a copy that runs this build's rabihost.
    if H.run("command -v systemd-analyze").code == 0 then
      local copy = H.tmpname("unit") .. ".service"
      local out = assert(io.open(copy, "w"))
      -- (without its man page link: the page is not installed here)
      local local_unit = unit:gsub("/usr/bin/rabihost", (H.run("pwd").stdout:gsub("%s+$", "")) .. "/build/rabihost")
      out:write((local_unit:gsub("\nDocumentation=[^\n]*", "")))
      out:close()
      local res = H.run { "systemd-analyze", "verify", copy }
      os.remove(copy)
      assert.equal(0, res.code, res.stdout .. res.stderr)
      assert.equal("", res.stdout .. res.stderr)
    end
  end)
end)

-- The HTTP gateway (issue 14): POST /rpc/NAME and GET /rpc through a real
-- HTTP client (curl, and python3's socket for pipelining and a slow
-- client), every status it answers, its limits, Lua routes, TLS, and a
-- broker restart. The spec runs its own private broker, which it restarts.
local H = require "helper"
local cjson = require "cjson"

local broker = H.Broker.new { dir = "build/gateway-broker" }

-- An HTTP request with curl. opts: method, path, body, headers (list of
-- "Name: value"), port, scheme, curl (more arguments).
-- -> status, body, headers (lower-case name -> value), seconds taken
local function http(port, opts)
  local base = H.tmpname("http")
  local cmd = { "curl", "-s", "-S", "--max-time", "20", "-o", base .. ".body", "-D", base .. ".hdr",
                "-w", "%{http_code}", "-X", opts.method or "GET" }
  for _, h in ipairs(opts.headers or {}) do cmd[#cmd + 1] = "-H"; cmd[#cmd + 1] = h end
  if opts.body then
    H.write_file(base .. ".in", opts.body)
    cmd[#cmd + 1] = "--data-binary"; cmd[#cmd + 1] = "@" .. base .. ".in"
    cmd[#cmd + 1] = "-H"; cmd[#cmd + 1] = "Content-Type: application/json"
  end
  for _, a in ipairs(opts.curl or {}) do cmd[#cmd + 1] = a end
  cmd[#cmd + 1] = ("%s://127.0.0.1:%d%s"):format(opts.scheme or "http", port, opts.path or "/")
  local res = H.run(cmd)
  local headers = {}
  for line in (H.read_file(base .. ".hdr") or ""):gmatch("[^\r\n]+") do
    local k, v = line:match("^([^:]+):%s*(.*)$")
    if k then headers[k:lower()] = v end
  end
  return tonumber(res.stdout), H.read_file(base .. ".body") or "", headers, res.elapsed, res.stderr
end

local function post(port, path, body, headers)
  return http(port, { method = "POST", path = path, body = body, headers = headers })
end

-- Asserts a JSON error answer: its status and kind. -> the decoded body
local function assert_error(status, kind, got_status, body, headers)
  assert.equal(status, got_status, body)
  assert.matches("^application/json", headers["content-type"] or "")
  local v = cjson.decode(body)
  assert.equal(kind, v.kind, body)
  assert.is_string(v.message)
  return v
end

-- The gateway's port from the supervisor's log line.
local function gateway_port(host)
  local port = H.wait_until(function() return host:log():match("HTTP gateway on %S+ %(port (%d+)%)") end, 10)
  return assert(tonumber(port), "no gateway port in the log:\n" .. host:log())
end

-- A config file with an http section (and nothing else).
local function config(http)
  local path = H.tmpname("gateway-config") .. ".lua"
  local parts = {}
  for k, v in pairs(http) do parts[#parts + 1] = ("%s = %s"):format(k, type(v) == "string" and ("%q"):format(v) or tostring(v)) end
  H.write_file(path, "http = { " .. table.concat(parts, ", ") .. " }\n")
  return path
end

local function start(http_cfg, extra_args, env)
  local args = { "--http", "127.0.0.1:0", "-c", config(http_cfg or {}) }
  for _, a in ipairs(extra_args or {}) do args[#args + 1] = a end
  local host = H.start { dir = "spec/fixtures/http", args = args, broker = broker, env = env }
  return host, gateway_port(host)
end

-- python3 with a script, the port as argv[1]. -> stdout, stderr, code
local function py(script, port, ...)
  local cmd = { H.python, "-c", script, tostring(port) }
  for _, a in ipairs { ... } do cmd[#cmd + 1] = a end
  local res = H.run(cmd)
  return res.stdout, res.stderr, res.code
end

describe("the HTTP gateway", function()
  setup(function() broker:start() end)
  teardown(function()
    H.stop_all()
    H.wait_background()
    broker:stop()
  end)

  describe("serving beside the functions", function()
    local host, port, S
    setup(function()
      host, port = start({ client_timeout = 2, max_body = 2048, header_limit = 8192 })
      S = host.suffix
    end)
    teardown(function() host:stop() end)

    it("POST /rpc/NAME with a bare array answers the result as JSON", function()
      local status, body, headers = post(port, "/rpc/add" .. S, "[2, 3]")
      assert.equal(200, status, body)
      assert.equal("application/json", headers["content-type"])
      assert.equal("5\n", body)
    end)

    it("takes args and kwargs, and an empty body as no arguments", function()
      local status, body = post(port, "/rpc/greet" .. S, '{"args": ["Ada"], "kwargs": {"greeting": "Hi"}}')
      assert.equal(200, status, body)
      assert.equal('"Hi, Ada!"\n', body)
      status, body = post(port, "/rpc/greet" .. S, '{"kwargs": {"name": "Bo"}}')
      assert.equal(200, status, body)
      assert.equal('"Hello, Bo!"\n', body)
      status, body = post(port, "/rpc/greet" .. S, "")
      assert_error(400, "invalid_argument", status, body, select(3, post(port, "/rpc/greet" .. S, "")))
      assert.matches("missing required argument 'name'", cjson.decode(body).message)
    end)

    it("GET /rpc lists the functions served, with their params, and the Lua routes", function()
      local status, body = http(port, { path = "/rpc" })
      assert.equal(200, status, body)
      local v = cjson.decode(body)
      local add
      for _, f in ipairs(v.functions) do if f.name == "add" .. S then add = f end end
      assert.is_table(add, body)
      assert.same({ "a:number", "b:number" }, add.params)
      assert.equal("async", add.ftype)
      table.sort(v.routes)
      assert.same({ "GET /both", "GET /broken", "GET /early", "GET /large", "GET /missing", "GET /text", "POST /shout" },
        v.routes)
    end)

    it("maps every failure to its status with a JSON {kind, message}", function()
      assert_error(404, "no_route", post(port, "/rpc/nothing" .. S, "[]"))
      local v = assert_error(502, "remote", post(port, "/rpc/fail" .. S, "[]"))
      assert.equal("kaboom on purpose", v.message)
      v = assert_error(400, "invalid_argument", post(port, "/rpc/add" .. S, "[1, 2, 3]"))
      assert.equal("add" .. S .. " takes at most 2 arguments but 3 were given", v.message)
      assert_error(400, "invalid_argument", post(port, "/rpc/add" .. S, '[1, "x"]'))
      assert_error(400, "invalid_argument", post(port, "/rpc/add" .. S, "{not json"))
      assert_error(400, "invalid_argument", post(port, "/rpc/add" .. S, '{"args": {"a": 1}}'))
      assert_error(400, "invalid_argument", post(port, "/rpc/add" .. S, '{"argz": [1, 2]}'))
      assert_error(404, "not_found", http(port, { path = "/nowhere" }))
      local status, body, headers = http(port, { path = "/rpc/add" .. S })
      assert_error(405, "method_not_allowed", status, body, headers)
      assert.equal("POST", headers.allow)
      status, body, headers = post(port, "/rpc", "[]")
      assert_error(405, "method_not_allowed", status, body, headers)
      assert.equal("GET, HEAD", headers.allow)
    end)

    it("X-Request-Timeout becomes the call's timeout: 504 when it passes", function()
      local status, body, headers, elapsed = post(port, "/rpc/slow" .. S, "[3]", { "X-Request-Timeout: 0.5" })
      local v = assert_error(504, "timeout", status, body, headers)
      assert.matches("within 0.5 s", v.message)
      assert.is_true(elapsed < 2.5, "took " .. elapsed .. " s")
      assert_error(400, "invalid_argument", post(port, "/rpc/add" .. S, "[1, 2]", { "X-Request-Timeout: soon" }))
      status, body = post(port, "/rpc/slow" .. S, "[0.2]", { "X-Request-Timeout: 5" })
      assert.equal(200, status, body)
    end)

    it("queue_full is 503 with Retry-After", function()
      -- narrow runs one call and queues one: of four at once, at least one is refused.
      local base = H.tmpname("narrow")
      local script = {}
      for i = 1, 4 do
        script[#script + 1] = ("curl -s -o %s.%d.body -D %s.%d.hdr -w '%%{http_code}' -X POST --data-binary '[1]' "
          .. "http://127.0.0.1:%d/rpc/narrow%s > %s.%d.code &"):format(base, i, base, i, port, S, base, i)
      end
      script[#script + 1] = "wait"
      H.run { "sh", "-c", table.concat(script, "\n") }
      local full = 0
      for i = 1, 4 do
        local code = tonumber(H.read_file(("%s.%d.code"):format(base, i)))
        if code == 503 then
          full = full + 1
          local body = H.read_file(("%s.%d.body"):format(base, i))
          assert.equal("queue_full", cjson.decode(body).kind, body)
          assert.matches("\r\nRetry%-After: 1\r\n", H.read_file(("%s.%d.hdr"):format(base, i)))
        else
          assert.equal(200, code)
        end
      end
      assert.is_true(full >= 1, "no call was refused")
    end)

    it("a body over http.max_body is 413, and the gateway goes on answering", function()
      local big = "[" .. ("1,"):rep(2000) .. "1]"
      assert_error(413, "body_too_large", post(port, "/rpc/add" .. S, big))
      -- chunked, so that no Content-Length announces it
      local status, body, headers = http(port, { method = "POST", path = "/rpc/add" .. S, body = big,
                                                 headers = { "Transfer-Encoding: chunked" } })
      assert_error(413, "body_too_large", status, body, headers)
      assert.equal(200, (post(port, "/rpc/add" .. S, "[1, 1]")))
    end)

    it("headers over http.header_limit are refused with 431", function()
      local status = http(port, { path = "/rpc", headers = { "X-Big: " .. ("a"):rep(10000) } })
      assert.equal(431, status)
      assert.equal(200, (post(port, "/rpc/add" .. S, "[1, 1]")))
    end)

    it("keeps a connection alive across requests, and answers pipelined requests in order", function()
      -- curl reuses the connection for the second URL (--next): "Re-using existing connection".
      local res = H.run { "curl", "-s", "-v", "-X", "POST", "--data-binary", "[1, 2]",
        ("http://127.0.0.1:%d/rpc/add%s"):format(port, S), "--next", "-X", "POST", "--data-binary", "[3, 4]",
        ("http://127.0.0.1:%d/rpc/add%s"):format(port, S) }
      assert.equal("3\n7\n", res.stdout)
      assert.matches("Re%-using existing connection", res.stderr)
      -- Two requests in one write on one socket.
      local out, err = py([==[
import socket, sys
port, name = int(sys.argv[1]), sys.argv[2]
def req(body):
    return ("POST /rpc/%s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (name, len(body), body)).encode()
s = socket.create_connection(("127.0.0.1", port), timeout=10)
s.sendall(req("[10, 1]") + req("[20, 2]"))
data = b""
while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"\n"):
    chunk = s.recv(65536)
    if not chunk: break
    data += chunk
bodies = [part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0] for part in data.split(b"HTTP/1.1 200 OK")[1:]]
sys.stdout.write("|".join(b.decode() for b in bodies))
]==], port, "add" .. S)
      assert.equal("11\n|22\n", out, err)
    end)

    it("a slow client does not hold the worker, and is dropped after http.client_timeout", function()
      local log = H.tmpname("slow") .. ".out"
      H.background(("%s -c %s %d > %s"):format(H.python, H.quote([==[
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"POST /rpc/add HTTP/1.1\r\nHost: x\r\nContent-Le")
t0 = time.time()
s.settimeout(15)
try:
    data = s.recv(1024)
except Exception as e:
    data = b"error"
print("closed after %.1f s: %r" % (time.time() - t0, data))
]==]), port, log))
      H.sleep(0.3)
      for _ = 1, 3 do
        local status, body, _, elapsed = post(port, "/rpc/add" .. S, "[1, 2]")
        assert.equal(200, status, body)
        assert.is_true(elapsed < 1, "an answer took " .. elapsed .. " s beside the slow client")
      end
      local line = H.wait_until(function() return H.read_file(log) ~= "" and H.read_file(log) end, 10)
      assert.is_string(line, "the slow client was never dropped")
      local after = tonumber(line:match("closed after ([%d.]+) s"))
      assert.is_true(after >= 1 and after < 5, line)
    end)

    it("a Lua route makes two calls in parallel", function()
      local status, body = http(port, { path = "/both?a=2&b=40" })
      assert.equal(200, status, body)
      local v = cjson.decode(body)
      assert.equal(42, v.sum)
      assert.equal(0.5, v.slow)
      assert.is_true(v.elapsed < 0.9, "the calls ran one after the other: " .. v.elapsed .. " s")
    end)

    it("a Lua route shapes its answer: status, JSON, headers, text; errors as the gateway's", function()
      local status, body, headers = post(port, "/shout", '{"text": "hey"}')
      assert.equal(201, status, body)
      assert.equal("yes", headers["x-spec"])
      assert.same({ said = "HEY", agent = true }, cjson.decode(body))
      status, body, headers = http(port, { path = "/text" })
      assert.equal(200, status)
      assert.equal("plain words", body)
      assert.matches("^text/plain", headers["content-type"])
      assert_error(400, "invalid_argument", post(port, "/shout", "not json"))
      assert_error(404, "no_route", http(port, { path = "/missing" }))
      local v = assert_error(500, "internal", http(port, { path = "/broken" }))
      assert.not_matches("a bug in the route", v.message) -- logged, not sent
      assert.matches("a bug in the route", host:log())
      status, body, headers = http(port, { method = "DELETE", path = "/text" })
      assert_error(405, "method_not_allowed", status, body, headers)
      assert.equal("GET", headers.allow)
    end)

    it("survives a broker restart: 503 connection while it is down, answers once it is back", function()
      assert.equal(200, (post(port, "/rpc/add" .. S, "[1, 1]")))
      broker:stop()
      local v = assert_error(503, "connection", post(port, "/rpc/add" .. S, "[1, 1]"))
      assert.is_string(v.message)
      broker:start()
      local ok = H.wait_until(function() return post(port, "/rpc/add" .. S, "[2, 2]") == 200 end, 30, 0.5)
      assert.is_truthy(ok, host:log())
      local status, body = post(port, "/rpc/add" .. S, "[20, 22]")
      assert.equal(200, status)
      assert.equal("42\n", body)
    end)
  end)

  describe("limits, token and TLS", function()
    it("beyond http.max_inflight requests: 503 overloaded with Retry-After", function()
      local host, port = start({ max_inflight = 2 })
      local base = H.tmpname("inflight")
      local script = {}
      for i = 1, 2 do
        script[#script + 1] = ("curl -s -o /dev/null -X POST --data-binary '[1]' http://127.0.0.1:%d/rpc/slow%s &")
          :format(port, host.suffix)
      end
      script[#script + 1] = "sleep 0.4"
      script[#script + 1] = ("curl -s -o %s.body -D %s.hdr -w '%%{http_code}' -X POST --data-binary '[1]' "
        .. "http://127.0.0.1:%d/rpc/slow%s"):format(base, base, port, host.suffix)
      script[#script + 1] = "wait"
      local res = H.run { "sh", "-c", table.concat(script, "\n") }
      assert.equal("503", res.stdout)
      assert.equal("overloaded", cjson.decode(H.read_file(base .. ".body")).kind)
      assert.matches("\r\nRetry%-After: 1\r\n", H.read_file(base .. ".hdr"))
      host:stop()
    end)

    it("a bearer token: 401 with WWW-Authenticate without it, and the token never in the log", function()
      local token = "s3cret-" .. H.random_hex(8)
      local host, port = start({}, nil, { RABIHOST_HTTP_TOKEN = token })
      local status, body, headers = post(port, "/rpc/add" .. host.suffix, "[1, 2]")
      assert_error(401, "unauthorized", status, body, headers)
      assert.equal('Bearer realm="rabihost"', headers["www-authenticate"])
      assert_error(401, "unauthorized", post(port, "/rpc/add" .. host.suffix, "[1, 2]", { "Authorization: Bearer wrong" }))
      status, body = post(port, "/rpc/add" .. host.suffix, "[1, 2]", { "Authorization: Bearer " .. token })
      assert.equal(200, status, body)
      assert.equal("3\n", body)
      local res = H.cli({ "show-config" }, { env = { RABIHOST_HTTP_TOKEN = token }, broker = broker })
      assert.not_matches(token, res.stdout)
      host:stop()
      assert.not_matches(token, host:log())
    end)

    it("TLS: HTTPS with a certificate and key, checked by curl --cacert", function()
      local dir = H.tmpname("tls")
      os.execute("mkdir -p " .. H.quote(dir))
      local res = H.run(("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 "
        .. "-addext subjectAltName=IP:127.0.0.1 -keyout %s/key.pem -out %s/cert.pem"):format(dir, dir))
      assert.equal(0, res.code, res.stderr)
      local host, port = start({}, { "--tls-cert", dir .. "/cert.pem", "--tls-key", dir .. "/key.pem" })
      assert.matches("HTTP gateway on https://", host:log())
      local status, body = http(port, { method = "POST", path = "/rpc/add" .. host.suffix, body = "[4, 5]",
                                        scheme = "https", curl = { "--cacert", dir .. "/cert.pem" } })
      assert.equal(200, status, body)
      assert.equal("9\n", body)
      -- Plain HTTP on the TLS port gets no answer.
      assert.is_not.equal(200, (http(port, { path = "/rpc" })))
      host:stop()
    end)
  end)

  describe("the review of the gateway (defects found and fixed)", function()
    it("accepts connections again after reaching http.max_connections and closing them idle", function()
      local host, port = start({ max_connections = 2, client_timeout = 1 })
      -- Two idle connections fill the limit; the gateway closes both after client_timeout.
      local out, err = py([==[
import socket, sys, time
port = int(sys.argv[1])
socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
t0 = time.time()
for s in socks:
    try:
        s.recv(1)
    except Exception as e:
        print("error: %r" % e)
print("closed after %.1f s" % (time.time() - t0))
]==], port)
      assert.matches("closed after", out, err)
      H.sleep(0.5)
      local status, body = http(port, { path = "/text", curl = { "--max-time", "5" } })
      assert.equal(200, status, body)
      assert.equal("plain words", body)
      host:stop()
    end)
  end)

  describe("the review of the gateway: the bearer token", function()
    it("is checked with the headers: 401 before any body is read; the scheme in any case", function()
      local token = "s3cret-" .. H.random_hex(8)
      local host, port = start({ client_timeout = 5 }, nil, { RABIHOST_HTTP_TOKEN = token })
      -- Headers announcing a 1 MiB body, and no body: the answer comes at once.
      local out, err = py([==[
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
s.sendall(("POST /rpc/add%s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           "Content-Length: 1048576\r\n\r\n" % sys.argv[2]).encode())
data = b""
try:
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk: break
        data += chunk
except socket.timeout:
    pass
sys.stdout.write(data.decode("latin-1"))
]==], port, host.suffix)
      assert.matches("^HTTP/1.1 401", out, err)
      assert.matches('\r\nWWW%-Authenticate: Bearer realm="rabihost"\r\n', out)
      -- The scheme is case-insensitive (RFC 7235); the token is not.
      local status, body = post(port, "/rpc/add" .. host.suffix, "[1, 2]", { "Authorization: BEARER " .. token })
      assert.equal(200, status, body)
      assert.equal("3\n", body)
      assert_error(401, "unauthorized", post(port, "/rpc/add" .. host.suffix, "[1, 2]",
        { "Authorization: Bearer " .. token:upper() }))
      assert_error(401, "unauthorized", post(port, "/rpc/add" .. host.suffix, "[1, 2]",
        { "Authorization: Bearer " .. token .. "x" }))
      assert_error(401, "unauthorized", post(port, "/rpc/add" .. host.suffix, "[1, 2]",
        { "Authorization: Basic " .. token }))
      host:stop()
      assert.not_matches(token, host:log())
    end)
  end)

  describe("the review of the gateway: a drain", function()
    it("lets an answer being written to a slow reader finish", function()
      local host, port = start({}, { "--drain-timeout", "20" })
      local n = 12 * 1024 * 1024
      local ended, out = H.background(("%s -c %s %d %d"):format(H.python, H.quote([==[
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
s.settimeout(20)
s.connect(("127.0.0.1", port))
s.sendall(("GET /large?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % n).encode())
head, body = b"", 0
while True:
    try:
        chunk = s.recv(65536)
    except OSError as e:
        print("error: %r" % e)
        break
    if not chunk: break
    if b"\r\n\r\n" not in head:
        head += chunk
        if b"\r\n\r\n" in head:
            head, _, rest = head.partition(b"\r\n\r\n")
            head += b"\r\n\r\n"
            body = len(rest)
    else:
        body += len(chunk)
    if body >= n: break
    time.sleep(0.01)
print(head.split(b"\r\n")[0].decode(), "body", body)
]==]), port, n))
      H.sleep(1)
      host:kill("TERM")
      assert.is_truthy(H.wait_until(ended, 30), "the slow reader never ended")
      local line = H.read_file(out)
      assert.matches("^HTTP/1.1 200 OK body " .. n, line)
      assert.equal(0, host:wait_exit(20), host:log())
    end)
  end)

  describe("the review of the gateway: on one host", function()
    local host, port, S
    setup(function()
      host, port = start({ client_timeout = 2, max_body = 4096 })
      S = host.suffix
    end)
    teardown(function() host:stop() end)

    -- A client that sends one byte every 0.5 s (never idle for
    -- client_timeout), after the prefix. -> seconds until the gateway closed
    -- the connection, or nil when it was still open after 10 s
    local function trickle(prefix)
      local out, err = py([==[
import select, socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
s.sendall(sys.argv[2].encode())
t0 = time.time()
while time.time() - t0 < 10:
    try:
        s.sendall(b"a")
        r, _, _ = select.select([s], [], [], 0.5)
        if r and not s.recv(4096):
            break
    except OSError:
        break
else:
    print("still open")
    sys.exit(0)
print("closed after %.1f s" % (time.time() - t0))
]==], port, prefix)
      if out:match("still open") then return nil end
      return assert(tonumber(out:match("closed after ([%d.]+) s")), out .. err)
    end

    it("cuts a chunked body that runs on past http.max_body instead of reading it without end", function()
      local out, err = py([==[
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
s.settimeout(10)
s.connect(("127.0.0.1", int(sys.argv[1])))
s.sendall(("POST /rpc/add%s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" % sys.argv[2]).encode())
chunk = b"400\r\n" + b"1" * 1024 + b"\r\n"
sent, t0 = 0, time.time()
try:
    while sent < 64 * 1024 * 1024 and time.time() - t0 < 10:
        s.sendall(chunk)
        sent += 1024
    print("still open after %d bytes" % sent)
except OSError as e:
    print("cut after %d bytes, %.2f s: %r" % (sent, time.time() - t0, e))
]==], port, S)
      local sent, after = out:match("cut after (%d+) bytes, ([%d.]+) s")
      assert.is_string(sent, out .. err)
      -- at once: not by client_timeout (2 s)
      assert.is_true(tonumber(sent) < 16 * 1024 * 1024 and tonumber(after) < 1, out)
      -- a chunked body a little over the limit is still answered 413
      local big = "[" .. ("1,"):rep(3000) .. "1]"
      assert_error(413, "body_too_large", http(port, { method = "POST", path = "/rpc/add" .. S, body = big,
                                                       headers = { "Transfer-Encoding: chunked" } }))
      assert.equal(200, (post(port, "/rpc/add" .. S, "[1, 1]")))
    end)

    it("answers errors whose message quotes bytes that are not UTF-8 with their JSON body", function()
      local v = assert_error(404, "no_route", post(port, "/rpc/add" .. S .. "%FF", "[1, 2]"))
      assert.matches("\\xFF", v.message)
      v = assert_error(404, "not_found", http(port, { path = "/nothere%FF" }))
      assert.matches("/nothere\\xFF", v.message, 1, true)
      v = assert_error(400, "invalid_argument", post(port, "/rpc/add" .. S, "[1, 2]", { "X-Request-Timeout: \255" }))
      assert.matches("X-Request-Timeout", v.message, 1, true)
    end)

    it("a request path that reads as a route's key (\"GET /text\") is 404, not 500", function()
      assert_error(404, "not_found", http(port, { method = "POST", path = "/", curl = { "--request-target", "GET%20/text" } }))
    end)

    it("HEAD on a GET route runs it, without the body", function()
      local status, body, headers = http(port, { method = "HEAD", path = "/text", curl = { "-I" } })
      assert.equal(200, status, body)
      assert.matches("^text/plain", headers["content-type"] or "")
      assert.equal("11", headers["content-length"])
      assert.equal("", body:match("\r\n\r\n(.*)$") or "")
    end)

    it("a route returning an interim (1xx) status is refused: 500 internal, logged", function()
      local v = assert_error(500, "internal", http(port, { path = "/early", curl = { "--max-time", "5" } }))
      assert.matches("1xx", v.message, 1, true)
      assert.matches("GET /early: the route returned 103", host:log(), 1, true)
    end)

    it("closes a connection whose headers come too slowly (a byte at a time) after client_timeout", function()
      local after = trickle("POST /rpc/add" .. S .. " HTTP/1.1\r\nHost: x\r\nX-Slow: ")
      assert.is_not_nil(after, "the slow client was never closed")
      assert.is_true(after >= 1.5 and after < 4, "closed after " .. after .. " s")
    end)

    it("closes a connection whose body comes too slowly after client_timeout", function()
      local after = trickle("POST /rpc/add" .. S .. " HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
      assert.is_not_nil(after, "the slow client was never closed")
      assert.is_true(after >= 1.5 and after < 4, "closed after " .. after .. " s")
      -- a request that takes its time to be answered is not cut
      local status, body = post(port, "/rpc/slow" .. S, "[2.5]")
      assert.equal(200, status, body)
    end)
  end)

  describe("rabihost gateway", function()
    it("serves the gateway only, with two workers on one socket, calling another host's functions", function()
      local host = H.start { dir = "spec/fixtures/http", broker = broker }
      local base = H.tmpname("gw")
      os.execute(("( env RABIBRIDGE_URL=%s RABI_SPEC_SUFFIX=%s %s gateway --listen 127.0.0.1:0 -w 2 "
        .. "--drain-timeout 5 spec/fixtures/http/routes.lua >%s.log 2>&1 & echo $! >%s.pid; wait ) "
        .. ">/dev/null 2>&1 </dev/null &"):format(H.quote(broker.url), host.suffix, H.rabihost, base, base))
      local pid = tonumber(H.wait_until(function() return H.read_file(base .. ".pid") end, 10))
      local function log() return H.read_file(base .. ".log") or "" end
      local port = tonumber(H.wait_until(function() return log():match("HTTP gateway on %S+ %(port (%d+)%)") end, 10))
      assert.is_number(port, log())
      assert.is_truthy(H.wait_until(function() return select(2, log():gsub("worker: starting", "")) >= 0
        and log():match("started 2 workers") end, 10), log())
      H.sleep(0.5)
      for i = 1, 6 do
        local status, body = post(port, "/rpc/add" .. host.suffix, ("[%d, 1]"):format(i))
        assert.equal(200, status, body)
        assert.equal(("%d\n"):format(i + 1), body)
      end
      local status, body = http(port, { path = "/both?a=1&b=2" })
      assert.equal(200, status, body)
      assert.not_matches("serving %d+ function", log())
      H.signal_if(pid, "rabihost", 15)
      assert.is_truthy(H.wait_until(function() return log():match("exited with status 0") end, 10), log())
      host:stop()
    end)
  end)
end)

-- TLS (issue 4): amqps:// against a private broker with a TLS listener and
-- certificates made here with openssl. A good CA connects; a wrong CA or a
-- wrong host name is refused with a clear error.
local H = require "helper"

local DIR = "build/spec-tmp/tls"

-- Runs a shell command line; -> its stdout (raises with its output on failure).
local function sh(cmd)
  local p = assert(io.popen("(" .. cmd .. ") 2>" .. DIR .. ".err; echo \"rc=$?\""))
  local out = p:read("*a")
  p:close()
  local body, rc = out:match("^(.-)rc=(%d+)%s*$")
  if rc ~= "0" then
    local f = io.open(DIR .. ".err")
    local err = f and f:read("*a") or ""
    if f then f:close() end
    error(cmd .. "\n" .. err, 2)
  end
  return body
end

-- A CA, a server certificate for DNS:localhost signed by it, and an
-- unrelated CA that signed nothing of ours.
local function make_certs()
  os.execute("rm -rf " .. DIR .. " && mkdir -p " .. DIR)
  local o = "openssl"
  sh(("cd %s && %s req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=rabibridge-test-ca -keyout ca.key -out ca.pem")
    :format(DIR, o))
  sh(("cd %s && %s req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=some-other-ca -keyout other.key -out other.pem")
    :format(DIR, o))
  sh(("cd %s && %s req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr"):format(DIR, o))
  local f = io.open(DIR .. "/san.ext", "w")
  f:write("subjectAltName = DNS:localhost\n")
  f:close()
  sh(("cd %s && %s x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile san.ext -out server.pem")
    :format(DIR, o))
  sh("chmod 644 " .. DIR .. "/*")
end

describe("TLS", function()
  local tls_port, abs, rabi, broker

  setup(function()
    rabi = H.rabi()
    make_certs()
    abs = sh("cd " .. DIR .. " && pwd"):gsub("%s+$", "")
    tls_port = sh([[python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])']])
      :gsub("%s+$", "")
    local conf = io.open(DIR .. "/tls.conf", "w")
    conf:write(("listeners.ssl.default = %s\nssl_options.cacertfile = %s/ca.pem\n"
      .. "ssl_options.certfile = %s/server.pem\nssl_options.keyfile = %s/server.key\n"
      .. "ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n")
      :format(tls_port, abs, abs, abs))
    conf:close()
    -- A private broker: the suite's has no TLS listener.
    broker = H.Broker.start_private { dir = "build/tls-broker", extra_conf = abs .. "/tls.conf" }
  end)

  teardown(function()
    H.stop_all()
    if broker then broker:stop() end
  end)

  local function url(host) return ("amqps://guest:guest@%s:%s/"):format(host, tls_port) end

  it("connects with the CA that signed the broker's certificate, and calls over it", function()
    local cfg = DIR .. "/rabibridge.lua"
    local f = io.open(cfg, "w")
    f:write(("rabbitmq = { host = 'localhost', port = %s, username = 'guest', password = 'guest' }\n"
      .. "tls = { ca_cert = '%s/ca.pem' }\n"):format(tls_port, abs))
    f:close()
    -- The host takes its broker and TLS settings from the config file alone.
    local host = H.start { dir = "spec/fixtures/basic", args = { "-c", cfg }, env = { RABIBRIDGE_URL = false } }
    local client = rabi.client { url = url("localhost"), tls = { ca_cert = abs .. "/ca.pem" }, timeout = 10 }:connect()
    assert.equal(5, client:remote_call(host:name("add"), { 2, 3 }))
    client:close()
  end)

  it("refuses a broker whose certificate another CA signed", function()
    local client = rabi.client { url = url("localhost"), tls = { ca_cert = abs .. "/other.pem" } }
    local err = H.expect_error("connection", client.connect, client)
    assert.matches("SSL", err.message)
    assert.matches("localhost:" .. tls_port, err.message, 1, true)
  end)

  it("refuses a host name the certificate does not name, unless told not to check it", function()
    local client = rabi.client { url = url("127.0.0.1"), tls = { ca_cert = abs .. "/ca.pem" } }
    local err = H.expect_error("connection", client.connect, client)
    assert.matches("hostname", err.message:lower())
    local lax = rabi.client { url = url("127.0.0.1"), tls = { ca_cert = abs .. "/ca.pem", verify_hostname = false } }
    lax:connect()
    assert.is_true(lax:is_connected())
    lax:close()
  end)

  it("names a CA file that cannot be read", function()
    local client = rabi.client { url = url("localhost"), tls = { ca_cert = abs .. "/missing.pem" } }
    local err = H.expect_error("connection", client.connect, client)
    assert.matches("missing.pem", err.message, 1, true)
  end)
end)

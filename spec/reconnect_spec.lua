-- Broker connections that drop: the broker closes a client's or a worker's
-- connection (as a broker restart or a network failure would) and each
-- reconnects by itself.
local H = require "helper"

describe("a dropped broker connection", function()
  local host, rabi
  local function N(base) return host:name(base) end
  local fx = H.host_fixture { dir = "spec/fixtures/basic", client = false } -- each test connects its own

  setup(function()
    rabi = H.rabi()
    host = fx:start()
  end)

  teardown(function() fx:stop() end)

  local function find_connection(pred)
    for _, c in ipairs(H.connections()) do
      if pred(c) then return c end
    end
  end

  it("fails the client's calls in flight with kind connection, and the client reconnects", function()
    local name = "spec client " .. H.random_hex(4)
    local client = H.client { connection_name = name, timeout = 10 }
    assert.equal(2, client:remote_call(N("add"), { 1, 1 }))
    local conn = find_connection(function(c) return c.name == name end)
    assert.is_table(conn, "the client's connection is not on the broker")
    local t = rabi.spawn(function() return client:try_remote_call(N("sleep"), { 3 }) end)
    rabi.sleep(0.3)
    H.close_connection(conn.pid)
    local ok, success, code, err = rabi.wait(t)
    assert.is_true(ok)
    assert.is_false(success, "the call in flight succeeded over a closed connection")
    assert.equal("connection", err.kind)
    -- Calls made now wait for the new link.
    local t0 = H.now()
    local okc, r = pcall(client.remote_call, client, N("add"), { 2, 2 })
    assert.is_true(okc, tostring(r))
    assert.equal(4, r)
    assert.is_true(H.now() - t0 < 8)
    assert.is_true(client:is_connected())
    client:close()
  end)

  it("makes a worker reconnect in place and serve again", function()
    local worker = tonumber(host:log():match("%[(%d+) w0%] serving"))
    local ports = H.broker_ports_of(worker)
    assert.is_true(#ports >= 1, "no broker connection found for worker " .. worker)
    local closed = 0
    for _, c in ipairs(H.connections()) do
      for _, p in ipairs(ports) do
        if c.peer_port == p then
          H.close_connection(c.pid)
          closed = closed + 1
        end
      end
    end
    assert.is_true(closed >= 1)
    local log = H.wait_until(function()
      local l = host:log()
      return l:find("serving again", 1, true) and l
    end, 15)
    assert.is_string(log, "the worker did not reconnect:\n" .. host:log())
    local client = H.client()
    assert.equal(6, client:remote_call(N("add"), { 3, 3 }))
    assert.equal("again", client:remote_call(N("echo"), { "again" }))
    client:close()
    -- the same process, not a restart
    assert.equal(worker, tonumber(host:log():match("%[(%d+) w0%] reconnected")))
  end)
end)

-- The spec helper's own logic that needs no broker: H.expect_error's
-- verdicts and messages, and how a Broker object names its node.
local H = require "helper"
local errors = require "rabibridge.errors"

-- -> the failure H.expect_error raised for fn, as text (asserting it failed)
local function failure_of(kind, fn, ...)
  local ok, err = pcall(H.expect_error, kind, fn, ...)
  assert.is_false(ok, "H.expect_error accepted it")
  return tostring(err)
end

describe("H.expect_error", function()
  it("returns the error value when fn raises one of the kind asked", function()
    local e = H.expect_error("timeout", function(a, b) errors.raise("timeout", a .. b) end, "too ", "slow")
    assert.equal("timeout", e.kind)
    assert.equal("too slow", e.message)
  end)

  it("fails with the values fn returned when it raised nothing, nils included", function()
    local msg = failure_of("timeout", function() return 1, "two", nil end)
    assert.matches('expected an error of kind timeout; the call returned 1, "two", nil', msg, 1, true)
  end)

  it("fails saying nothing came back when fn returned nothing", function()
    assert.matches("the call returned nothing", failure_of("timeout", function() end), 1, true)
  end)

  it("fails with the text of a string error", function()
    local msg = failure_of("no_route", function() error("plain text", 0) end)
    assert.matches('the call raised "plain text"', msg, 1, true)
    assert.matches("a string error", msg, 1, true)
  end)

  it("fails with the kind and message of an error of another kind", function()
    local msg = failure_of("timeout", function() errors.raise("no_route", "no queue for x") end)
    assert.matches('raised error value {kind = "no_route", message = "no queue for x"}', msg, 1, true)
    assert.matches("kind no_route", msg, 1, true)
  end)

  it("fails for a table without a kind", function()
    assert.matches("a table without kind", failure_of("timeout", function() error({}) end), 1, true)
  end)

  it("names the spec's line, not the helper's", function()
    local msg = failure_of("timeout", function() end)
    assert.not_matches("helper.lua", msg:match("^[^\n]*"), 1, true)
  end)
end)

describe("H.Broker", function()
  it("takes the port from a URL, and none from a URL without one", function()
    assert.equal(5690, H.Broker.new { url = "amqp://guest:guest@127.0.0.1:5690/", ctl_prefix = "ctl" }.port)
    assert.is_nil(H.Broker.new { url = "amqp://user:1234@localhost/", ctl_prefix = "ctl" }.port)
  end)

  it("starts a private broker on a free port, then restarts it on the port it got", function()
    local b = H.Broker.new { dir = "build/some-broker" }
    assert.equal("env RABIBRIDGE_BROKER_DIR=build/some-broker scripts/broker.sh start --free-port", b:script("start"))
    assert.equal("env RABIBRIDGE_BROKER_DIR=build/some-broker scripts/broker.sh ctl", b.ctl_prefix)
    local url = b:learn_url("broker.sh: node up\namqp://guest:guest@127.0.0.1:4567/\n")
    assert.equal("amqp://guest:guest@127.0.0.1:4567/", url)
    assert.equal(4567, b.port)
    assert.matches("RABIBRIDGE_BROKER_PORT=4567 scripts/broker.sh start$", b:script("start"))
    assert.matches("for i in 1 2 3 4 5; do env ", b:start_script(), 1, true)
  end)

  it("is the suite's broker as H.broker, with the old H.url", function()
    assert.equal(H.url, H.broker.url)
    assert.equal(H.ctl_prefix, H.broker.ctl_prefix)
  end)
end)

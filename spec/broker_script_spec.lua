-- scripts/broker.sh, the private broker every spec runs on: a port it
-- found free may be taken before the node binds it (two nodes booting at
-- once, or anything else on the machine). The start then picks other ports
-- and boots again; any other failure ends it at once. spec/tools/
-- broker_clash.sh holds a port and hands it to the node's first pick.
local H = require "helper"

local dir = "build/clash-broker"

local function start_clashing(which)
  local res = H.run(("env RABIBRIDGE_BROKER_DIR=%s spec/tools/broker_clash.sh %s"):format(dir, which))
  local out = res.stdout .. res.stderr
  return res.code, out, tonumber(out:match("held (%d+)"))
end

describe("scripts/broker.sh start --free-port", function()
  teardown(function()
    H.run("env RABIBRIDGE_BROKER_DIR=" .. dir .. " scripts/broker.sh stop")
  end)

  it("boots on other ports when its distribution port was taken", function()
    local code, out, held = start_clashing("dist")
    assert.is_number(held, out)
    assert.matches(("found one of its ports taken %%(dist_port_already_used,%d%%); trying other ports"):format(held),
      out)
    assert.equal(0, code, out)
    assert.matches("\nrunning\n", out, 1, true)
    local port = tonumber(out:match("amqp://guest:guest@127%.0%.0%.1:(%d+)/"))
    assert.is_number(port, out)
    assert.not_equal(held, port)
  end)

  it("boots on other ports when its AMQP port was taken", function()
    local code, out, held = start_clashing("amqp")
    assert.matches("found one of its ports taken (eaddrinuse); trying other ports", out, 1, true)
    assert.equal(0, code, out)
    assert.matches("\nrunning\n", out, 1, true)
    assert.not_equal(held, tonumber(out:match("amqp://guest:guest@127%.0%.0%.1:(%d+)/")))
  end)

  it("boots on other ports when its epmd's port was taken, and leaves that port's owner alone", function()
    local code, out = start_clashing("epmd")
    assert.matches("found one of its ports taken (eaddrinuse); trying other ports", out, 1, true)
    assert.equal(0, code, out)
    assert.matches("\nrunning\n", out, 1, true)
  end)

  it("does not try again when the node fails for another reason", function()
    local conf = H.tmpname("conf")
    local f = assert(io.open(conf, "w"))
    f:write("no_such_setting.at_all = 1\n")
    f:close()
    local res = H.run(("env RABIBRIDGE_BROKER_DIR=%s RABIBRIDGE_BROKER_EXTRA_CONF=%s scripts/broker.sh start --free-port")
      :format(dir, H.quote(conf)))
    assert.equal(1, res.code)
    assert.matches("failed to start", res.stderr, 1, true)
    assert.matches("unknown variable: no_such_setting.at_all", res.stderr, 1, true)
    assert.not_matches("trying other ports", res.stderr, 1, true)
  end)
end)

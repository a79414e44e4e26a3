-- Settings and their failures (issue 4): every wrong setting gives one clear
-- line, a non-zero exit and no hang; show-config tells where each setting
-- came from; a client takes the same config file.
local H = require "helper"

local function url_with(user_pass, vhost)
  local hostport = H.url:match("@([^/]+)/")
  return ("amqp://%s@%s/%s"):format(user_pass, hostport, vhost or "")
end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  return path
end

local function one_line(s)
  local lines = 0
  for _ in s:gmatch("[^\n]+") do lines = lines + 1 end
  return lines == 1
end

describe("a setting that cannot work", function()
  teardown(function() H.stop_all() end)

  local cases = {
    { "wrong credentials", { "--url", url_with("guest:wrong") }, "ACCESS_REFUSED" },
    { "a vhost that does not exist", { "--url", url_with("guest:guest", "no-such-vhost") }, "vhost" },
    { "a malformed URL", { "--url", "notaurl" }, "malformed broker URL 'notaurl'" },
    { "an unreachable broker", { "--url", H.dead_url }, "cannot connect to the broker" },
  }
  for _, c in ipairs(cases) do
    it(c[1] .. ": call exits non-zero at once with one line saying so", function()
      local args = { "call", "anything", "1" }
      for _, a in ipairs(c[2]) do args[#args + 1] = a end
      local res = H.cli(args)
      assert.is_true(res.code ~= 0)
      assert.matches(c[3], res.stderr, 1, true)
      assert.is_true(one_line(res.stderr), res.stderr)
      assert.is_true(res.elapsed < 5, "took " .. res.elapsed .. " s")
    end)
  end

  it("wrong credentials: serve stops with a non-zero exit instead of restarting forever", function()
    local res = H.run({ H.rabihost, "serve", "--url", url_with("guest:wrong"), "spec/fixtures/basic" })
    assert.is_true(res.code ~= 0)
    assert.matches("ACCESS_REFUSED", res.stderr, 1, true)
    assert.matches("before serving; stopping", res.stderr, 1, true)
    assert.is_true(res.elapsed < 10, "took " .. res.elapsed .. " s")
  end)

  it("an unreadable config file is named", function()
    local res = H.cli { "call", "-c", "/nonexistent/rabibridge.lua", "anything" }
    assert.is_true(res.code ~= 0)
    assert.matches("cannot read config file", res.stderr, 1, true)
    assert.matches("/nonexistent/rabibridge.lua", res.stderr, 1, true)
  end)

  it("an invalid config file is reported with its line", function()
    local cfg = write(H.tmpname("badcfg") .. ".lua", "rabbitmq = {\n  host = 'x',\n")
    local res = H.cli { "show-config", "-c", cfg }
    assert.is_true(res.code ~= 0)
    assert.matches("badcfg[^:]*%.lua:%d+", res.stderr)
  end)

  it("an encrypted password with the wrong secret is reported as such, before any login", function()
    local hostport = H.url:match("@([^/]+)/")
    local host, port = hostport:match("^(.-):(%d+)$")
    local enc = H.cli { "encrypt-password", "--secret", "right", "guest" }.stdout:gsub("%s+$", "")
    local cfg = write(H.tmpname("cfg") .. ".lua", ("rabbitmq = { host = %q, port = %s, username = 'guest', "
      .. "password = %q }\nsecret = { secret = 'wrong' }\n"):format(host, port, enc))
    local res = H.run({ H.rabihost, "call", "-c", cfg, "anything" }, { env = { RABIBRIDGE_URL = false } })
    assert.is_true(res.code ~= 0)
    assert.matches("wrong secret", res.stderr, 1, true)
  end)
end)

describe("show-config", function()
  it("prints each setting with where it came from, the password masked", function()
    local cfg = write(H.tmpname("cfg") .. ".lua",
      "rabbitmq = { host = 'broker.example', port = 5673, username = 'u', password = 'plain-secret' }\n"
      .. "app = { compress_threshold = 2048, serialiser = 'msgpack' }\n")
    local res = H.run({ H.rabihost, "show-config", "-c", cfg, "--log-level", "WARN" },
      { env = { RABIBRIDGE_URL = false, RABBITMQ_HOST = false } })
    assert.equal(0, res.code, res.stderr)
    assert.matches("compress_threshold%s+2048%s+%(config file%)", res.stdout)
    assert.matches("serialiser%s+msgpack%s+%(config file%)", res.stdout)
    assert.matches("log_level%s+WARN%s+%(option%)", res.stdout)
    assert.matches("cid_max%s+1073741824%s+%(default%)", res.stdout)
    assert.matches("amqp://u:%*%*%*%*@broker.example:5673/", res.stdout)
    assert.not_matches("plain%-secret", res.stdout)
  end)
end)

describe("a client with a config file", function()
  teardown(function() H.stop_all() end)

  it("connects with the file's broker and serialiser", function()
    local host = H.start { dir = "spec/fixtures/interop", args = { "--serialiser", "msgpack" } }
    local hostport = H.url:match("@([^/]+)/")
    local bhost, port = hostport:match("^(.-):(%d+)$")
    local cfg = write(H.tmpname("cfg") .. ".lua", ("rabbitmq = { host = %q, port = %s }\n"
      .. "app = { serialiser = 'msgpack' }\n"):format(bhost, port))
    -- The suite's RABIBRIDGE_URL names the same broker and wins over the
    -- file, as documented; the serialiser can only come from the file.
    local client = H.rabi().client { config = cfg, timeout = 10 }
    assert.equal("msgpack", client.codec.name)
    assert.equal(cfg, client.settings.config_file)
    client:connect()
    assert.equal(5, client:remote_call(host:name("lua_add"), { 2, 3 }))
    client:close()
  end)
end)

-- RabiBridge's own configuration as it is deployed (issue 10 points 5 and
-- 6, issue 12's config typos and secrets): its config/env.toml, its
-- encrypted passwords, RABBITMQ_PASSWORD with SECRET, non-ASCII credentials,
-- unknown names with a suggestion, and no password in any output.
local H = require "helper"

local PW_TOOL = "spec/tools/rabi_password.py"
local SAMPLE_SECRET = "your secret that no one knows"
local SAMPLE_VALUE = "fMgmG7+ooAYLjXdPnhInjQ==" -- RabiBridge's env.toml: AES(base64("123456"))

local broker_host, broker_port = H.url:match("@([^/:]+):(%d+)/")

-- Nothing from the suite's environment may choose the broker for these.
local CLEAN = { RABIBRIDGE_URL = false, RABBITMQ_HOST = false, RABBITMQ_PORT = false,
                RABBITMQ_USERNAME = false, RABBITMQ_PASSWORD = false, SECRET = false,
                RABIBRIDGE_CONFIG = false }

local function env(extra)
  local e = {}
  for k, v in pairs(CLEAN) do e[k] = v end
  for k, v in pairs(extra or {}) do e[k] = v end
  return e
end

local function py(...)
  local res = H.run { H.python, PW_TOOL, ... }
  assert(res.code == 0, "rabi_password.py failed: " .. res.stderr)
  return (res.stdout:gsub("%s+$", ""))
end

local function toml_string(s)
  return '"' .. s:gsub('[\\"]', "\\%0") .. '"'
end

-- RabiBridge's config/env.toml, line for line, with this broker and user.
local function env_toml(user, password_value, secret, app_extra)
  return ([[
[rabbitmq]
RABBITMQ_HOST = '%s'
RABBITMQ_PORT = %s
RABBITMQ_USERNAME = %s
RABBITMQ_PASSWORD = %s

[app]
LOG_LEVEL = 'INFO'
DEBUG_MODE = false
CID_MAX = 1073741824
COMPRESS_THRESHOLD = 1024
SERIALISER = 'msgpack'
%s
[secret]
SECRET = %s
]]):format(broker_host, broker_port, toml_string(user), toml_string(password_value), app_extra or "",
    toml_string(secret))
end

local function write(name, text)
  local path = H.tmpname("cfg") .. "-" .. name
  H.write_file(path, text)
  return path
end

-- A broker user of its own for a test; removed in teardown.
local users = {}
local function add_user(name, password)
  H.ctl(("add_user %s %s"):format(H.quote(name), H.quote(password)))
  users[#users + 1] = name
  H.ctl(("set_permissions -p / %s '.*' '.*' '.*'"):format(H.quote(name)))
  return name
end

local function remove_users()
  for _, name in ipairs(users) do pcall(H.ctl, "delete_user " .. H.quote(name)) end
  users = {}
end

describe("RabiBridge's configuration and passwords against the broker", function()
  local host, ADD
  local sample_user, intl_user
  local INTL_PASSWORD = "pässwörd-€ @/:#?%25" -- non-ASCII, and every character a URL reserves

  setup(function()
    host = H.start { dir = "spec/fixtures/basic", args = { "--serialiser", "msgpack" } }
    ADD = host:name("add")
    sample_user = add_user("rabi_sample_" .. H.random_hex(3), "123456")
    intl_user = add_user("üsér-ñ-" .. H.random_hex(3), INTL_PASSWORD)
  end)
  teardown(function()
    H.stop_all()
    remove_users()
  end)

  local function call_with(cfg, extra_env, args)
    local cmd = { "call", "--serialiser", "msgpack", ADD, "2", "3" }
    if cfg then table.insert(cmd, 2, "-c") table.insert(cmd, 3, cfg) end
    for _, a in ipairs(args or {}) do cmd[#cmd + 1] = a end
    return H.cli(cmd, { env = env(extra_env) })
  end

  describe("config/env.toml as RabiBridge ships it", function()
    it("its sample password (AES of base64 of 123456) logs in", function()
      local cfg = write("env.toml", env_toml(sample_user, SAMPLE_VALUE, SAMPLE_SECRET))
      local res = call_with(cfg)
      assert.equal(0, res.code, res.stderr)
      assert.equal("5\n", res.stdout)
      assert.equal("", res.stderr) -- every section and key is known
    end)

    it("a value from RabiBridge's encrypt_pwd (AES of the password itself) logs in too", function()
      assert.equal("/PVbueoeqoyjzZipLBXIow==", py("encrypt-pwd", "123456", "my secret"))
      local cfg = write("env.toml", env_toml(sample_user, "/PVbueoeqoyjzZipLBXIow==", "my secret"))
      local res = call_with(cfg)
      assert.equal(0, res.code, res.stderr)
      assert.equal("5\n", res.stdout)
    end)

    it("a non-ASCII user whose password a second implementation encrypted logs in", function()
      local value = py("file-value", INTL_PASSWORD, "sécret")
      local cfg = write("env.toml", env_toml(intl_user, value, "sécret"))
      local res = call_with(cfg)
      assert.equal(0, res.code, res.stderr)
      assert.equal("5\n", res.stdout)
    end)

    it("the wrong password is refused: the login above is not a fluke", function()
      local value = py("file-value", "not-" .. INTL_PASSWORD, "sécret")
      local cfg = write("env.toml", env_toml(intl_user, value, "sécret"))
      local res = call_with(cfg)
      assert.is_true(res.code ~= 0)
      assert.matches("ACCESS_REFUSED", res.stderr, 1, true)
      assert.not_matches("pässwörd", res.stderr, 1, true)
    end)

    it("rabi.client{ config = FILE } reads it: broker, serialiser and numbers", function()
      local cfg = write("env.toml", env_toml(sample_user, SAMPLE_VALUE, SAMPLE_SECRET))
      local script = write("client.lua", [[
local rabi = require "rabibridge"
local c = rabi.client { config = arg[1], timeout = 10 }
io.write(c.codec.name, " ", c.settings.cid_max, " ", c.settings.compress_threshold, " ")
c:connect()
io.write(c:remote_call(arg[2], { 20, 22 }), "\n")
c:close()
]])
      local res = H.run({ H.rabihost, "run", script, cfg, ADD }, { env = env() })
      assert.equal(0, res.code, res.stderr)
      assert.equal("msgpack 1073741824 1024 42\n", res.stdout)
    end)

    it("is found at ./config/env.toml, where RabiBridge looks for it", function()
      local dir = H.tmpname("project")
      os.execute("mkdir -p " .. H.quote(dir .. "/config"))
      H.write_file(dir .. "/config/env.toml", env_toml(sample_user, SAMPLE_VALUE, SAMPLE_SECRET))
      local rabihost = H.rabihost:sub(1, 1) == "/" and H.rabihost or (os.getenv("PWD") .. "/" .. H.rabihost)
      local res = H.run({ "sh", "-c", 'cd "$1" && exec "$2" show-config', "sh", dir, rabihost }, { env = env() })
      assert.equal(0, res.code, res.stderr)
      assert.matches("config_file%s+config/env.toml%s+%(%./config/env.toml%)", res.stdout)
      assert.matches("serialiser%s+msgpack%s+%(config file%)", res.stdout)
      assert.matches("url%s+amqp://rabi_sample_%x+:%*%*%*%*@", res.stdout)
    end)

    it("a TOML error names the file, line and column", function()
      local cfg = write("env.toml", "[rabbitmq]\nRABBITMQ_HOST = 'x'\nRABBITMQ_PORT = \n")
      local res = H.cli({ "show-config", "-c", cfg }, { env = env() })
      assert.equal(78, res.code)
      assert.matches(cfg:gsub("%p", "%%%0") .. ":3:%d+:", res.stderr)
    end)

    it("RabiBridge's log levels map onto the host's", function()
      local cfg = write("env.toml", (env_toml(sample_user, SAMPLE_VALUE, SAMPLE_SECRET)
        :gsub("LOG_LEVEL = 'INFO'", "LOG_LEVEL = 'WARNING'")))
      local res = H.cli({ "show-config", "-c", cfg }, { env = env() })
      assert.equal(0, res.code, res.stderr)
      assert.matches("log_level%s+WARN%s+%(config file%)", res.stdout)
    end)
  end)

  describe("RABBITMQ_PASSWORD with SECRET in the environment", function()
    it("is decrypted", function()
      local res = call_with(nil, { RABBITMQ_HOST = broker_host, RABBITMQ_PORT = broker_port,
        RABBITMQ_USERNAME = sample_user, RABBITMQ_PASSWORD = SAMPLE_VALUE, SECRET = SAMPLE_SECRET })
      assert.equal(0, res.code, res.stderr)
      assert.equal("5\n", res.stdout)
    end)

    it("overrides the file's password alone; show-config says where each part came from", function()
      local cfg = write("env.toml", env_toml(intl_user, py("file-value", "wrong", "s"), "s"))
      local value = py("file-value", INTL_PASSWORD, "s")
      local res = call_with(cfg, { RABBITMQ_PASSWORD = value })
      assert.equal(0, res.code, res.stderr)
      assert.equal("5\n", res.stdout)
      local show = H.cli({ "show-config", "-c", cfg }, { env = env { RABBITMQ_PASSWORD = value } })
      assert.matches("(config file + RABBITMQ_PASSWORD)", show.stdout, 1, true)
    end)

    it("with the wrong SECRET says so, showing neither the password nor its ciphertext", function()
      local res = call_with(nil, { RABBITMQ_HOST = broker_host, RABBITMQ_PORT = broker_port,
        RABBITMQ_USERNAME = sample_user, RABBITMQ_PASSWORD = SAMPLE_VALUE, SECRET = "not the secret" })
      assert.is_true(res.code ~= 0)
      assert.matches("RABBITMQ_PASSWORD", res.stderr, 1, true)
      assert.matches("wrong secret", res.stderr, 1, true)
      assert.not_matches(SAMPLE_VALUE, res.stderr, 1, true)
    end)
  end)

  describe("non-ASCII user names and passwords", function()
    it("work in a percent-encoded --url", function()
      local pe = require("rabibridge.config").percent_encode
      local url = ("amqp://%s:%s@%s:%s/"):format(pe(intl_user), pe(INTL_PASSWORD), broker_host, broker_port)
      local res = call_with(nil, nil, { "--url", url })
      assert.equal(0, res.code, res.stderr)
      assert.equal("5\n", res.stdout)
    end)

    it("work in a Lua config file, unencrypted", function()
      local cfg = write("cfg.lua", ("rabbitmq = { host = %q, port = %s, username = %q, password = %q }\n")
        :format(broker_host, broker_port, intl_user, INTL_PASSWORD))
      local res = call_with(cfg)
      assert.equal(0, res.code, res.stderr)
      assert.equal("5\n", res.stdout)
    end)

    it("a refused non-ASCII login names the user, never the password", function()
      local pe = require("rabibridge.config").percent_encode
      local url = ("amqp://%s:%s@%s:%s/"):format(pe(intl_user), pe("wrông"), broker_host, broker_port)
      local res = call_with(nil, nil, { "--url", url })
      assert.is_true(res.code ~= 0)
      assert.matches("ACCESS_REFUSED", res.stderr, 1, true)
      assert.matches(intl_user, res.stderr, 1, true)
      assert.not_matches("wrông", res.stderr, 1, true)
      assert.not_matches("wr%C3%B4ng", res.stderr, 1, true)
    end)
  end)
end)

describe("encrypt-password", function()
  it("writes RabiBridge's own sample for its sample password", function()
    local res = H.cli { "encrypt-password", "--secret", SAMPLE_SECRET, "123456" }
    assert.equal(0, res.code, res.stderr)
    assert.equal(SAMPLE_VALUE .. "\n", res.stdout)
  end)

  it("writes what RabiBridge's runtime reads, non-ASCII included", function()
    local password = "pässwörd-€ @/:"
    local res = H.cli { "encrypt-password", "--secret", "sécret", password }
    assert.equal(0, res.code, res.stderr)
    assert.equal(password, py("runtime-read", (res.stdout:gsub("%s+$", "")), "sécret"))
  end)

  it("reads the password from stdin with -", function()
    local res = H.cli({ "encrypt-password", "--secret", SAMPLE_SECRET, "-" }, { stdin = "123456\n" })
    assert.equal(0, res.code, res.stderr)
    assert.equal(SAMPLE_VALUE .. "\n", res.stdout)
  end)

  it("takes the secret from a TOML config's [secret] section", function()
    local cfg = write("env.toml", env_toml("u", SAMPLE_VALUE, SAMPLE_SECRET))
    local res = H.cli({ "encrypt-password", "-c", cfg, "123456" }, { env = env() })
    assert.equal(0, res.code, res.stderr)
    assert.equal(SAMPLE_VALUE .. "\n", res.stdout)
  end)
end)

describe("no password in any output", function()
  local SECRET_TEXT = "S3cretPW"
  local urls = {
    "amqp://user:S3cretPW",                      -- no host: the password parses as a port
    "amqp://user:S3cretPW/vhost",
    "amqp://u:S3cr@tPW@127.0.0.1:1/",            -- an unencoded '@'
    "amqp://u:S3cretPW@host:notaport/",
    "amqp://u:S3c%ZZretPW@127.0.0.1:1/",         -- a bad escape
    "amqp://u:S3cr etPW@127.0.0.1:1/",           -- a space: two URLs to the parser
    "amqp://u:S3cretPW@127.0.0.1:1/ amqp://v:S3cretPW@127.0.0.1:1/",
    "u:S3cretPW@127.0.0.1",
    "amqps://us%C3%A9r:S3cretPW@127.0.0.1:1/",
  }
  local function leaks(text)
    return text:find("S3c", 1, true) or text:find("etPW", 1, true) or text:find("tPW", 1, true)
  end

  it("core.mask_url hides every part of it", function()
    local mask = require("rabibridge.config").mask_url
    for _, url in ipairs(urls) do
      assert.is_falsy(leaks(mask(url)), url .. " -> " .. mask(url))
    end
    assert.equal("amqp://guest:****@localhost:5672/", mask("amqp://guest:guest@localhost:5672/"))
    assert.equal("amqp://host:5672/vh", mask("amqp://host:5672/vh"))
    assert.equal("amqp://[::1]:5672/", mask("amqp://[::1]:5672/"))
    assert.equal("notaurl", mask("notaurl"))
  end)

  for _, url in ipairs(urls) do
    it("call, show-config and serve with --url " .. url, function()
      local res = H.cli({ "call", "--url", url, "--timeout", "2", "anything" }, { env = env() })
      assert.is_true(res.code ~= 0)
      assert.is_falsy(leaks(res.stdout .. res.stderr), res.stderr)
      local show = H.cli({ "show-config", "--url", url }, { env = env() })
      assert.equal(0, show.code, show.stderr)
      assert.is_falsy(leaks(show.stdout .. show.stderr), show.stdout)
      local serve = H.run({ H.rabihost, "serve", "--url", url, "spec/fixtures/basic" },
        { env = env { RABI_SPEC_SUFFIX = H.new_suffix() } })
      assert.is_true(serve.code ~= 0)
      assert.is_falsy(leaks(serve.stdout .. serve.stderr), serve.stderr)
    end)
  end

  it("show-config of a config with an encrypted password shows neither", function()
    local cfg = write("env.toml", env_toml("u", SAMPLE_VALUE, SAMPLE_SECRET))
    local res = H.cli({ "show-config", "-c", cfg }, { env = env() })
    assert.equal(0, res.code, res.stderr)
    assert.not_matches("123456", res.stdout, 1, true)
    assert.not_matches(SAMPLE_VALUE, res.stdout, 1, true)
    assert.not_matches(SAMPLE_SECRET, res.stdout, 1, true)
    assert.matches("url%s+amqp://u:%*%*%*%*@", res.stdout)
  end)
end)

describe("unknown sections and keys", function()
  it("in TOML: each is named, with the nearest known name in the file's own style", function()
    local cfg = write("env.toml", env_toml("u", SAMPLE_VALUE, SAMPLE_SECRET, "LOG_LEVL = 'DEBUG'\n")
      .. "\n[rabitmq]\nRABBITMQ_HOTS = 'x'\n\n[tls]\nverify_peeer = false\nzzzzzz = 1\n")
    local res = H.cli({ "show-config", "-c", cfg }, { env = env() })
    assert.equal(0, res.code, res.stderr)
    assert.matches("unknown key 'app.LOG_LEVL' (did you mean 'LOG_LEVEL'?)", res.stderr, 1, true)
    assert.matches("unknown section 'rabitmq' (did you mean 'rabbitmq'?)", res.stderr, 1, true)
    assert.matches("unknown key 'tls.verify_peeer' (did you mean 'verify_peer'?)", res.stderr, 1, true)
    assert.matches("unknown key 'tls.zzzzzz' in ", res.stderr, 1, true)
    assert.matches("log_level%s+INFO", res.stdout) -- the typo set nothing
  end)

  it("in Lua: the same, and each warning once however often the config is read", function()
    local cfg = write("cfg.lua", "rabitmq = { host = 'x' }\napp = { log_levl = 'DEBUG', serialiser = 'msgpack' }\n"
      .. "rabbitmq = { RABBITMQ_HOTS = 'y', port = 1 }\n")
    local script = write("twice.lua", "local rabi = require 'rabibridge'\nrabi.client { config = arg[1] }\n"
      .. "rabi.client { config = arg[1] }\n")
    local res = H.run({ H.rabihost, "run", script, cfg }, { env = env() })
    assert.equal(0, res.code, res.stderr)
    assert.matches("unknown key 'app.log_levl' (did you mean 'log_level'?)", res.stderr, 1, true)
    assert.matches("unknown section 'rabitmq' (did you mean 'rabbitmq'?)", res.stderr, 1, true)
    assert.matches("unknown key 'rabbitmq.RABBITMQ_HOTS' (did you mean 'RABBITMQ_HOST'?)", res.stderr, 1, true)
    local _, n = res.stderr:gsub("log_levl", "")
    assert.equal(1, n, res.stderr)
  end)

  it("suggest.closest finds typos and leaves far words alone", function()
    local suggest = require "rabibridge.suggest"
    local keys = { "log_level", "debug_mode", "serialiser", "timeout", "fetch_size" }
    assert.equal("log_level", suggest.closest("log_levl", keys))
    assert.equal("timeout", suggest.closest("timeot", keys))
    assert.equal("fetch_size", suggest.closest("fetch_sise", keys))
    assert.equal("serialiser", suggest.closest("serializer", keys))
    assert.equal("debug_mode", suggest.closest("DEBUG_MDOE", keys)) -- a swap, any case
    assert.is_nil(suggest.closest("zzzzzz", keys))
    assert.is_nil(suggest.closest("", keys))
    assert.equal("rabbitmq", suggest.closest("rabitmq", { rabbitmq = true, app = true }))
  end)
end)

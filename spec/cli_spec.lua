-- The command line: --version, --help, call, run, repl, and mistakes.
-- README: The command line.
local H = require "helper"
local cjson = require "cjson"

local function lines(s)
  local out = {}
  for l in s:gmatch("[^\n]+") do out[#out + 1] = l end
  return out
end

describe("rabihost", function()
  it("--version prints the version and exits 0", function()
    local res = H.cli { "--version" }
    assert.equal(0, res.code)
    assert.matches("^rabihost %d+%.%d+%.%d+%s*$", res.stdout)
  end)

  it("--help prints the usage of every command and exits 0", function()
    local res = H.cli { "--help" }
    assert.equal(0, res.code)
    for _, word in ipairs { "usage", "serve", "call", "run", "repl", "--workers", "--kwargs", "--timeout" } do
      assert.matches(word, res.stdout, 1, true)
    end
  end)

  it("an unknown command exits non-zero and says so on stderr", function()
    local res = H.cli { "frobnicate" }
    assert.is_true(res.code ~= 0)
    assert.equal("", res.stdout)
    assert.matches("unknown command", res.stderr, 1, true)
    assert.matches("frobnicate", res.stderr, 1, true)
  end)

  it("an unknown option exits non-zero and names the option", function()
    local res = H.cli { "call", "--bogus-option", "x" }
    assert.is_true(res.code ~= 0)
    assert.matches("--bogus-option", res.stderr, 1, true)
    local res2 = H.cli { "serve", "--bogus-option", "spec/fixtures/broken" }
    assert.is_true(res2.code ~= 0)
    assert.matches("--bogus-option", res2.stderr, 1, true)
  end)

  it("serve on a folder that does not exist exits non-zero at once, naming it", function()
    local missing = "build/spec-tmp/no-such-folder" .. H.new_suffix()
    local res = H.cli { "serve", missing }
    assert.is_true(res.code ~= 0)
    assert.matches(missing, res.stderr, 1, true)
    assert.is_true(res.elapsed < 5)
    -- and without the word serve
    local res2 = H.cli { missing .. "/" }
    assert.is_true(res2.code ~= 0)
    assert.matches(missing, res2.stderr, 1, true)
  end)

  it("encrypt-password gives RabiBridge's known answer (its env.toml's sample)", function()
    local res = H.cli { "encrypt-password", "--secret", "your secret that no one knows", "123456" }
    assert.equal(0, res.code, res.stderr)
    assert.equal("fMgmG7+ooAYLjXdPnhInjQ==\n", res.stdout)
  end)

  it("call exits non-zero with a connection error when the broker cannot be reached", function()
    local res = H.cli { "call", "--url", H.dead_url, "--timeout", "2", "anything", "1" }
    assert.is_true(res.code ~= 0)
    assert.equal("", res.stdout)
    assert.matches("connect", res.stderr)
    assert.is_true(res.elapsed < 10)
  end)
end)

describe("rabihost with a service running", function()
  local host
  local function N(base) return host:name(base) end

  setup(function()
    host = H.start { dir = "spec/fixtures/basic" }
  end)

  teardown(function()
    H.stop_all()
  end)

  describe("call", function()
    it("prints the result as JSON and exits 0", function()
      local res = H.cli { "call", N("add"), "2", "3" }
      assert.equal(0, res.code, res.stderr)
      assert.equal("5\n", res.stdout)
    end)

    it("prints a table result as JSON", function()
      local res = H.cli { "call", N("echo"), '{"a":[1,2,{"b":"c"}]}' }
      assert.equal(0, res.code, res.stderr)
      assert.same({ a = { 1, 2, { b = "c" } } }, cjson.decode(res.stdout))
    end)

    it("takes a bare word as a string", function()
      local res = H.cli { "call", N("echo"), "hello" }
      assert.equal(0, res.code, res.stderr)
      assert.equal('"hello"\n', res.stdout)
    end)

    it("prints null for a function that returns nothing", function()
      local res = H.cli { "call", N("nothing") }
      assert.equal(0, res.code, res.stderr)
      assert.equal("null\n", res.stdout)
    end)

    it("of an unknown function exits non-zero with one line naming no_route", function()
      local res = H.cli { "call", "no_such_function" .. H.new_suffix(), "1" }
      assert.is_true(res.code ~= 0)
      assert.equal("", res.stdout)
      local l = lines(res.stderr)
      assert.equal(1, #l, "stderr: " .. res.stderr)
      assert.matches("no_route", l[1], 1, true)
    end)

    it("of a failing function exits non-zero and prints the remote error", function()
      local res = H.cli { "call", N("fail"), "cli" }
      assert.is_true(res.code ~= 0)
      assert.equal("", res.stdout)
      assert.matches("remote", res.stderr, 1, true)
      assert.matches("kaboom: cli failed on purpose", res.stderr, 1, true)
    end)

    it("--kwargs binds keyword arguments", function()
      local res = H.cli { "call", N("bound"), "1", "--kwargs", '{"c": 3}' }
      assert.equal(0, res.code, res.stderr)
      assert.equal('"1|nil|3"\n', res.stdout)
      local res2 = H.cli { "call", "--kwargs", '{"a": 1, "b": 2}', N("add") }
      assert.equal(0, res2.code, res2.stderr)
      assert.equal("3\n", res2.stdout)
    end)

    it("--kwargs that is not a JSON object is refused", function()
      local res = H.cli { "call", N("add"), "--kwargs", "[1,2]" }
      assert.is_true(res.code ~= 0)
      assert.matches("kwargs", res.stderr, 1, true)
    end)

    it("--timeout gives up on a slow function and says timeout", function()
      local res = H.cli { "call", "--timeout", "0.5", N("sleep"), "3" }
      assert.is_true(res.code ~= 0)
      assert.equal("", res.stdout)
      assert.matches("timeout", res.stderr, 1, true)
      assert.is_true(res.elapsed < 2.5, ("--timeout 0.5 took %.2f s"):format(res.elapsed))
    end)

    describe("settings", function()
      local host_port = H.url:match("^amqp://[^@]*@([^/]+)")
      local host_name, port = host_port:match("^(.*):(%d+)$")
      local NO_URL = { RABIBRIDGE_URL = false, RABBITMQ_HOST = false, SECRET = false, RABIBRIDGE_CONFIG = false }

      local function config_file(password, secret)
        local path = H.tmpname("config") .. ".lua"
        H.write_file(path, ([[
rabbitmq = { host = %q, port = %s, username = "guest", password = %q }
app = { log_level = "WARN" }
%s
]]):format(host_name, port, password, secret and ("secret = { secret = %q }"):format(secret) or ""))
        return path
      end

      it("a config file with an encrypted password connects", function()
        local enc = H.cli { "encrypt-password", "--secret", "spec secret", "guest" }
        assert.equal(0, enc.code, enc.stderr)
        local cfg = config_file((enc.stdout:gsub("%s+$", "")), "spec secret")
        local res = H.cli({ "call", "-c", cfg, N("add"), "2", "2" }, { env = NO_URL })
        assert.equal(0, res.code, res.stderr)
        assert.equal("4\n", res.stdout)
      end)

      it("an encrypted password without its secret is refused with a clear message", function()
        local enc = H.cli { "encrypt-password", "--secret", "spec secret", "guest" }
        local cfg = config_file((enc.stdout:gsub("%s+$", "")), nil)
        local res = H.cli({ "call", "-c", cfg, N("add"), "2", "2" }, { env = NO_URL })
        assert.is_true(res.code ~= 0)
        assert.equal("", res.stdout)
        assert.matches("secret", res.stderr, 1, true)
      end)

      it("RABBITMQ_HOST and RABBITMQ_PORT are used when RABIBRIDGE_URL is unset", function()
        local env = { RABIBRIDGE_URL = false, RABBITMQ_HOST = host_name, RABBITMQ_PORT = port,
          RABBITMQ_USERNAME = "guest", RABBITMQ_PASSWORD = "guest" }
        local res = H.cli({ "call", N("add"), "3", "3" }, { env = env })
        assert.equal(0, res.code, res.stderr)
        assert.equal("6\n", res.stdout)
      end)

      it("--url wins over RABIBRIDGE_URL", function()
        local res = H.cli({ "call", "--url", H.url, N("add"), "1", "1" }, { env = { RABIBRIDGE_URL = H.dead_url } })
        assert.equal(0, res.code, res.stderr)
        assert.equal("2\n", res.stdout)
      end)

      it("a service's rabi.client() uses the host's --url, not the environment", function()
        local h = H.start { dir = "spec/fixtures/basic", args = { "--url", H.url },
          env = { RABIBRIDGE_URL = H.dead_url } }
        local res = H.cli { "call", h:name("sum_sq"), "[1,2,3]" }
        h:stop()
        assert.equal(0, res.code, res.stderr)
        assert.equal("14\n", res.stdout)
      end)
    end)

    it("--ftype sync calls a sync function", function()
      local res = H.cli { "call", "--ftype", "sync", N("syncfn"), "x" }
      assert.equal(0, res.code, res.stderr)
      assert.equal('"sync:x"\n', res.stdout)
    end)

    it("a parameter error exits non-zero and names the parameter", function()
      local res = H.cli { "call", N("add"), '"two"', "3" }
      assert.is_true(res.code ~= 0)
      assert.matches("'a'", res.stderr, 1, true)
    end)
  end)

  describe("run", function()
    it("runs a Lua client script with arg set and the module loaded", function()
      local res = H.cli { "run", "spec/fixtures/scripts/add.lua", N("add"), "20", "22" }
      assert.equal(0, res.code, res.stderr)
      assert.matches("script add.lua got 3 args", res.stdout, 1, true)
      assert.matches("result 42", res.stdout, 1, true)
    end)

    it("exits non-zero with the error when the script raises", function()
      local res = H.cli { "run", "spec/fixtures/scripts/fails.lua" }
      assert.is_true(res.code ~= 0)
      assert.matches("the script failed on purpose", res.stderr, 1, true)
    end)

    it("exits non-zero when the script does not exist", function()
      local res = H.cli { "run", "spec/fixtures/scripts/no_such_script.lua" }
      assert.is_true(res.code ~= 0)
      assert.matches("no_such_script.lua", res.stderr, 1, true)
    end)
  end)

  describe("repl", function()
    it("evaluates lines from a pipe with a connected client", function()
      local res = H.cli({ "repl" }, { stdin = ("client.fn.%s(2,3)\n"):format(N("add")) })
      assert.equal(0, res.code, res.stderr)
      assert.matches("\n5\n", "\n" .. res.stdout .. "\n")
    end)

    it("keeps state between lines, and continues multi-line input", function()
      local input = table.concat({
        "x = 40",
        "function plus(a,",
        "  b) return a + b end",
        ("client:remote_call(%q, { x, 2 })"):format(N("add")),
        "plus(1, 2)",
      }, "\n") .. "\n"
      local res = H.cli({ "repl" }, { stdin = input })
      assert.equal(0, res.code, res.stderr)
      assert.matches("\n42\n", "\n" .. res.stdout .. "\n")
      assert.matches("\n3\n", "\n" .. res.stdout .. "\n")
    end)

    it("shows an error and goes on to the next line", function()
      local input = ("client.fn.%s(1)\nprint('next line ran')\n"):format(N("fail"))
      local res = H.cli({ "repl" }, { stdin = input })
      assert.equal(0, res.code, res.stderr)
      assert.matches("kaboom", res.stdout .. res.stderr, 1, true)
      assert.matches("next line ran", res.stdout, 1, true)
    end)
  end)
end)

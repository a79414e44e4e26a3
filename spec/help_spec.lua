-- The command line explains itself: each command's --help, --url on every
-- command, the exit codes, and the man page made from the same table as
-- --help (lua/rabibridge/help.lua).
local H = require "helper"
local help = require "rabibridge.help"

local function has(haystack, needle, what)
  assert(haystack:find(needle, 1, true), ("%s lacks %q"):format(what, needle))
end

describe("rabihost COMMAND --help", function()
  for _, c in ipairs(help.commands) do
    it(c.name .. " --help prints its own usage, options and exit codes", function()
      local res = H.cli { c.name, "--help" }
      assert.equal(0, res.code, res.stderr)
      assert.equal("", res.stderr)
      has(res.stdout, "usage: rabihost " .. c.name .. " ", c.name .. " --help")
      for _, o in ipairs(c.options) do has(res.stdout, "--" .. o.long, c.name .. " --help") end
      has(res.stdout, "--url URL", c.name .. " --help")
      for _, e in ipairs(c.exits) do
        assert.matches("\n  " .. e[1] .. " +%S", res.stdout)
      end
      -- and not the other commands' usage
      for _, other in ipairs(help.commands) do
        if other ~= c then assert.is_nil(res.stdout:find("rabihost " .. other.name .. " " .. other.args, 1, true)) end
      end
      assert.equal(res.stdout, H.cli({ c.name, "-h" }).stdout)
      assert.equal(res.stdout, H.cli({ "help", c.name }).stdout)
    end)
  end

  it("--help after other arguments still means help, and does nothing else", function()
    local res = H.cli { "call", "--url", H.dead_url, "some_function", "1", "--help" }
    assert.equal(0, res.code, res.stderr)
    has(res.stdout, "usage: rabihost call", "call ... --help")
  end)

  it("an unknown option points to that command's --help", function()
    local res = H.cli { "repl", "--bogus" }
    assert.equal(64, res.code)
    has(res.stderr, "--bogus", "stderr")
    has(res.stderr, "rabihost repl --help", "stderr")
  end)
end)

describe("rabihost --help", function()
  it("documents every exit code and every command", function()
    local res = H.cli { "--help" }
    assert.equal(0, res.code)
    for _, e in ipairs(help.exit_codes) do assert.matches("\n  " .. e[1] .. " +%S", res.stdout) end
    for _, c in ipairs(help.commands) do has(res.stdout, "rabihost " .. c.name .. " ", "--help") end
  end)

  it("says what the man page says: every option and exit code is in both", function()
    local man = H.read_file("build/rabihost.1")
    assert.is_not_nil(man, "build/rabihost.1 (make builds it)")
    local out = H.cli({ "--help" }).stdout
    local n = 0
    for opt in out:gmatch("%-%-([%w][%w%-]*)") do
      n = n + 1
      has(man, "\\-\\-" .. opt:gsub("%-", "\\-"), "rabihost.1")
    end
    assert.is_true(n >= 12, "found only " .. n .. " options in --help")
    for code in out:match("\nexit status:\n(.-)\n\n"):gmatch("\n?  (%d+) ") do
      has(man, ".TP\n\\fB" .. code .. "\\fR\n", "rabihost.1 EXIT STATUS")
    end
  end)
end)

describe("README.md", function()
  it("lists the same exit codes as --help", function()
    local readme = assert(H.read_file("README.md"))
    local table_text = assert(readme:match("\n### Exit codes\n(.-)\n\n"), "README's exit code table")
    local listed = {}
    for code in table_text:gmatch("\n| (%d+) |") do listed[#listed + 1] = tonumber(code) end
    local documented = {}
    for _, e in ipairs(help.exit_codes) do documented[#documented + 1] = e[1] end
    assert.same(documented, listed)
  end)
end)

describe("--url on every command", function()
  it("run --url U FILE.lua connects to U; options after FILE.lua are the script's", function()
    local res = H.cli({ "run", "--url", H.url, "spec/fixtures/scripts/connects.lua", "--url", "x" },
      { env = { RABIBRIDGE_URL = H.dead_url } })
    assert.equal(0, res.code, res.stderr)
    has(res.stdout, "connected: true args: --url x", "stdout")
  end)

  it("run without --url uses the environment (and fails on a dead broker)", function()
    local res = H.cli({ "run", "spec/fixtures/scripts/connects.lua" }, { env = { RABIBRIDGE_URL = H.dead_url } })
    assert.equal(1, res.code)
    has(res.stderr, "connection", "stderr")
  end)

  it("show-config, repl and encrypt-password take --url", function()
    local masked = "amqp://someone:****@127.0.0.1:1/"
    local res = H.cli { "show-config", "--url", "amqp://someone:pw@127.0.0.1:1/" }
    assert.equal(0, res.code, res.stderr)
    has(res.stdout, masked, "show-config")
    res = H.cli({ "repl", "--url", "amqp://someone:pw@127.0.0.1:1/" }, { stdin = "" })
    assert.equal(0, res.code, res.stderr)
    has(res.stdout, masked, "repl banner")
    res = H.cli { "encrypt-password", "--url", H.dead_url, "--secret", "my secret", "123456" }
    assert.equal(0, res.code, res.stderr)
    -- The value itself (RabiBridge's runtime format) is checked in rabibridge_config_spec.
    assert.equal("123456", require("rabibridge.core").decrypt_password(res.stdout:gsub("\n$", ""), "my secret"))
  end)
end)

describe("exit codes", function()
  it("run on a service script says it is a service for rabihost serve, and exits 64", function()
    local res = H.cli { "run", "spec/fixtures/scripts/a_service.lua" }
    assert.equal(64, res.code)
    has(res.stderr, "is a service", "stderr")
    has(res.stderr, "svc_double, svc_triple", "stderr")
    has(res.stderr, "rabihost serve spec/fixtures/scripts/a_service.lua", "stderr")
  end)

  it("64 for usage, 66 for an unreadable script, 78 for a bad setting, 2 when serve cannot connect", function()
    assert.equal(64, H.cli({ "call", "--nope", "f" }).code)
    assert.equal(64, H.cli({ "call" }).code)
    assert.equal(64, H.cli({ "run" }).code)
    assert.equal(66, H.cli({ "run", "spec/fixtures/scripts/no_such_script.lua" }).code)
    assert.equal(78, H.cli({ "show-config", "--log-level", "LOUD" }).code)
    assert.equal(78, H.cli({ "call", "--serialiser", "xml", "f" }).code)
    local res = H.cli { "serve", "--url", H.dead_url, "spec/fixtures/scripts/a_service.lua" }
    assert.equal(2, res.code, res.stderr)
    -- and each is documented
    for _, code in ipairs { 64, 66, 78, 2 } do assert.is_string(help.exit_text(code)) end
  end)
end)

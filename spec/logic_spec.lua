-- The pure logic, with no broker and no host: binding arguments to params,
-- the shapes the serialisers put on the wire, config precedence, and the
-- error shape of the C bindings.
local service = require "rabibridge.service"
local serial = require "rabibridge.serial"
local config = require "rabibridge.config"
local errors = require "rabibridge.errors"
local core = require "rabibridge.core"

local function spec_of(opts)
  -- register_call builds the spec bind() reads; reset keeps the registry clean.
  local spec = service.register_call("logic_fn", opts, function() end)
  service.reset()
  return spec
end

describe("argument binding", function()
  local typed = spec_of { validate = true, params = { "a:number", "b:integer?", "c:string?" } }
  local loose = spec_of {}

  it("passes positional args through", function()
    local argv, n = service.bind(typed, { 1, 2, "x" }, {})
    assert.same({ 1, 2, "x" }, argv)
    assert.equal(3, n)
  end)

  it("binds kwargs to their positions", function()
    local argv, n = service.bind(typed, { 1 }, { c = "z" })
    assert.equal(1, argv[1])
    assert.is_nil(argv[2])
    assert.equal("z", argv[3])
    assert.equal(3, n)
  end)

  it("turns a top-level null into nil", function()
    local argv, n = service.bind(loose, { serial.null, 5 }, {})
    assert.is_nil(argv[1])
    assert.equal(5, argv[2])
    assert.equal(2, n)
  end)

  local refusals = {
    { "a missing required argument", {}, {}, "missing required argument 'a'" },
    { "too many arguments", { 1, 2, "x", 4 }, {}, "takes at most 3 arguments" },
    { "an unknown keyword", { 1 }, { d = 1 }, "unexpected keyword argument 'd'" },
    { "a value given twice", { 1 }, { a = 2 }, "multiple values for argument 'a'" },
    { "a wrong type", { "one" }, {}, "argument 'a' must be number" },
    { "a fraction for an integer", { 1, 2.5 }, {}, "argument 'b' must be integer, got 2.5" },
  }
  for _, case in ipairs(refusals) do
    it("refuses " .. case[1], function()
      local argv, msg = service.bind(typed, case[2], case[3])
      assert.is_nil(argv)
      assert.matches(case[4], msg, 1, true)
    end)
  end

  it("refuses kwargs for a function without params", function()
    local argv, msg = service.bind(loose, {}, { a = 1 })
    assert.is_nil(argv)
    assert.matches("takes no keyword arguments", msg, 1, true)
  end)
end)

describe("the serialisers' shapes", function()
  for _, name in ipairs { "json", "msgpack" } do
    local codec = assert(serial.get(name))

    it(name .. ": a request is [args, kwargs], empty ones kept as array and map", function()
      local args, kwargs = codec.decode_request(assert(codec.encode_request(nil, nil)))
      assert.same({}, args)
      assert.same({}, kwargs)
      assert.equal(serial.array_mt, getmetatable(args))
      assert.not_equal(serial.array_mt, getmetatable(kwargs))
    end)

    it(name .. ": args and kwargs survive a round trip", function()
      local args, kwargs = codec.decode_request(assert(codec.encode_request({ 1, "two", { 3 } }, { k = true })))
      assert.same({ 1, "two", { 3 } }, args)
      assert.same({ k = true }, kwargs)
    end)

    it(name .. ": a reply is [0, result] or [1, message]", function()
      assert.same({ true, 42 }, { codec.decode_reply(codec.encode_result(42)) })
      assert.same({ false, "boom" }, { codec.decode_reply(codec.encode_error("boom")) })
      local ok, result = codec.decode_reply(codec.encode_result(1, 2))
      assert.is_true(ok)
      assert.same({ 1, 2 }, result) -- several results travel as an array
    end)

    it(name .. ": refuses a request that is not [args, kwargs]", function()
      local args, msg = codec.decode_request(codec.encode(serial.null))
      assert.is_nil(args)
      assert.matches("expected %[args, kwargs%]", msg)
    end)
  end
end)

describe("config precedence", function()
  local saved_env = {}
  local env = {}
  local real_getenv = os.getenv
  setup(function()
    saved_env.getenv = os.getenv
    os.getenv = function(k) -- luacheck: ignore 122
      if env[k] ~= nil then return env[k] or nil end
      if k:match("^RABBITMQ_") or k:match("^RABIBRIDGE_") or k == "SECRET" then return nil end
      return real_getenv(k)
    end
  end)
  teardown(function() os.getenv = saved_env.getenv end) -- luacheck: ignore 122
  before_each(function() env = {} end)

  local function file(text)
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
    return path
  end

  it("uses RabbitMQ's default URL when nothing is set", function()
    local s = config.resolve {}
    assert.equal("amqp://guest:guest@localhost:5672/", s.url)
    assert.equal("default", s.sources.url)
  end)

  it("prefers the config file to the default", function()
    local path = file 'rabbitmq = { url = "amqp://f:f@file:5672/" }\napp = { cid_max = 77 }'
    local s = config.resolve { config = path }
    os.remove(path)
    assert.equal("amqp://f:f@file:5672/", s.url)
    assert.equal("config file", s.sources.url)
    assert.equal(77, s.cid_max)
  end)

  it("prefers the environment to the config file", function()
    local path = file 'rabbitmq = { url = "amqp://f:f@file:5672/" }'
    env.RABIBRIDGE_URL = "amqp://e:e@env:5672/"
    local s = config.resolve { config = path }
    os.remove(path)
    assert.equal("amqp://e:e@env:5672/", s.url)
    assert.equal("RABIBRIDGE_URL", s.sources.url)
  end)

  it("prefers an option (a flag) to the environment", function()
    env.RABIBRIDGE_URL = "amqp://e:e@env:5672/"
    local s = config.resolve { url = "amqp://o:o@opt:5672/", cid_max = 5 }
    assert.equal("amqp://o:o@opt:5672/", s.url)
    assert.equal("option", s.sources.url)
    assert.equal(5, s.cid_max)
    assert.equal("option", s.sources.cid_max)
  end)
end)

describe("the C bindings' error shape", function()
  it("misuse raises, naming the function and the option", function()
    local ok, msg = pcall(core.client_open, "amqp://guest:guest@127.0.0.1:1/", { heartbeat = "abc" })
    assert.is_false(ok)
    assert.matches("client: option 'heartbeat': number expected, got string", msg, 1, true)
    ok, msg = pcall(core.client_open, "amqp://guest:guest@127.0.0.1:1/", { tls = { verify_peer = "no" } })
    assert.is_false(ok)
    assert.matches("client: option 'tls.verify_peer': boolean expected, got string", msg, 1, true)
  end)

  it("rabi.client raises on an unknown option or one of the wrong type, at the caller's line", function()
    local rabi = require "rabibridge"
    local ok, msg = pcall(function() rabi.client { timeot = 5 } end)
    assert.is_false(ok)
    assert.matches("logic_spec.lua:%d+: client: unknown option 'timeot' %(did you mean 'timeout'%?%)", msg)
    ok, msg = pcall(rabi.client, { timeout = "5" })
    assert.is_false(ok)
    assert.matches("client: option 'timeout': number expected, got string", msg, 1, true)
    ok, msg = pcall(rabi.client, { url = 5 })
    assert.is_false(ok)
    assert.matches("client: option 'url': string or table expected, got number", msg, 1, true)
  end)

  it("an I/O failure returns nil and an error value with a kind", function()
    local c, err = core.client_open("amqp://guest:guest@127.0.0.1:1/", { connect_timeout = 2 })
    assert.is_nil(c)
    assert.is_true(errors.is_error(err))
    assert.equal("connection", err.kind)
    assert.matches("cannot connect", tostring(err))
  end)

  it("a cancelled wait resumes with nil and an error of kind cancelled", function()
    local t = core.spawn(function()
      local slept, err = core.sleep(10)
      local again, err2 = core.sleep(0) -- a cancelled task stays cancelled
      return slept, err, again, err2
    end)
    local t0 = core.now()
    assert.is_true(t:cancel())
    local ok, slept, err, again, err2 = core.wait(t)
    assert.is_true(ok)
    assert.is_nil(slept)
    assert.is_true(errors.is_error(err))
    assert.equal("cancelled", err.kind)
    assert.is_nil(again)
    assert.equal("cancelled", err2.kind)
    assert.is_true(core.now() - t0 < 1, "the sleep was not cut short")
  end)

  it("cancels a wait on a spawned task, and not the task itself", function()
    local inner = core.spawn(function() core.sleep(0.2) return "inner done" end)
    local outer = core.spawn(function() return core.wait(inner) end)
    outer:cancel()
    local ok, joined, err = core.wait(outer)
    assert.is_true(ok)
    assert.is_nil(joined)
    assert.equal("cancelled", err.kind)
    assert.same({ true, "inner done" }, { core.wait(inner) })
  end)
end)

describe("the command-line parser", function()
  local cli = require "rabibridge.cli"
  local spec, aliases = cli.command_spec "call"

  it("takes --opt value, --opt=value and flags anywhere among the positionals", function()
    local opts, pos = cli.parse({ "call", "--timeout", "5", "add", "--traceback", "1", "--ftype=sync", "2" }, 2,
      spec, aliases)
    assert.same({ timeout = "5", traceback = true, ftype = "sync" }, opts)
    assert.same({ "add", "1", "2" }, pos)
  end)

  it("gathers a repeated --url into one space-separated list", function()
    local opts = cli.parse({ "--url", "amqp://a/", "--url=amqp://b/" }, 1, spec, aliases)
    assert.equal("amqp://a/ amqp://b/", opts.url)
  end)

  it("reads negative numbers, '-' and everything after '--' as positionals", function()
    local opts, pos = cli.parse({ "add", "-5", "-", "--", "--timeout", "x" }, 1, spec, aliases)
    assert.same({}, opts)
    assert.same({ "add", "-5", "-", "--timeout", "x" }, pos)
  end)

  it("expands short aliases", function()
    local opts = cli.parse({ "-c", "cfg.lua", "-h" }, 1, spec, aliases)
    assert.equal("cfg.lua", opts.config)
    assert.is_true(opts.help)
  end)

  it("names an unknown option and an option missing its value", function()
    assert.same({ nil, "unknown option --timeot (did you mean --timeout?)" },
      { cli.parse({ "--timeot", "5" }, 1, spec, aliases) })
    assert.same({ nil, "unknown option --zzz" }, { cli.parse({ "--zzz" }, 1, spec, aliases) })
    assert.same({ nil, "option --timeout needs a value" }, { cli.parse({ "add", "--timeout" }, 1, spec, aliases) })
  end)

  it("with stop, leaves everything from the first positional to it", function()
    local opts, pos = cli.parse({ "--url", "u", "script.lua", "--url", "v" }, 1, spec, aliases, true)
    assert.same({ url = "u" }, opts)
    assert.same({ "script.lua", "--url", "v" }, pos)
  end)
end)

-- The operator's view (issue 12, points 1, 4 and 6): the log tells the
-- story of a call (a handler's error at WARN, an access log, JSON lines, no
-- password ever), a W3C traceparent ties the calls of one request together
-- in the logs, and the mistakes a Lua user makes are caught at start with a
-- message that names them.
local H = require "helper"
local cjson = require "cjson"

local FIXTURE = "spec/fixtures/observe"
local HEX32, HEX16 = ("%x"):rep(32), ("%x"):rep(16)

-- The lines of a host's log that contain every one of the given strings.
local function lines_with(log, ...)
  local needles, out = { ... }, {}
  for line in log:gmatch("[^\n]+") do
    local all = true
    for _, n in ipairs(needles) do
      if not line:find(n, 1, true) then all = false break end
    end
    if all then out[#out + 1] = line end
  end
  return out
end

-- The key=value fields of a text log line.
local function fields(line)
  local f = {}
  for k, v in line:gmatch(" ([%w_]+)=(%S+)") do f[k] = v end
  return f
end

-- Waits until the host's log has n lines containing every needle.
local function wait_lines(host, n, ...)
  local needles = { ... }
  local got = H.wait_until(function()
    local l = lines_with(host:log(), unpack(needles))
    return #l >= n and l
  end, 10)
  assert(got, ("expected %d log lines with %s:\n%s"):format(n, table.concat(needles, " + "), host:log()))
  return got
end

describe("a handler that raises", function()
  local fx = H.host_fixture { dir = FIXTURE }
  local host, client
  setup(function() host, client = fx:start() end)
  teardown(function() fx:stop() end)

  it("is logged at WARN with its function, cid and first line, and its trace id", function()
    local err = H.expect_error("remote", client.remote_call, client, host:name("raises"), { "boom" })
    local line = wait_lines(host, 1, "WARN", host:name("raises"), "raised:")[1]
    assert.matches("first line of the failure: boom", line, 1, true)
    assert.matches(" cid %d+ raised: ", line)
    -- the first line only: the rest of the message and the traceback are DEBUG's
    assert.is_nil(line:find("second line", 1, true))
    assert.is_nil(host:log():find("stack traceback", 1, true), "a traceback below DEBUG:\n" .. host:log())
    -- the error the caller got carries the trace id the log line shows
    assert.matches("^" .. HEX32 .. "$", err.trace_id)
    assert.equal(err.trace_id, fields(line).trace_id)
  end)

  it("logs no access lines unless the access log is on", function()
    client:remote_call(host:name("leaf"), { 0 })
    assert.equal(0, #lines_with(host:log(), " access "))
  end)
end)

describe("at DEBUG, a handler's error", function()
  local fx = H.host_fixture { dir = FIXTURE, args = { "--log-level", "DEBUG" } }
  local host, client
  setup(function() host, client = fx:start() end)
  teardown(function() fx:stop() end)

  it("comes with its traceback, and the call is not said to be served", function()
    H.expect_error("remote", client.remote_call, client, host:name("raises"), { "deep" })
    local tb = wait_lines(host, 1, "DEBUG", host:name("raises"), "stack traceback")[1]
    assert.matches("second line, for the traceback only", tb, 1, true)
    local done = wait_lines(host, 1, "DEBUG", host:name("raises"), " remote_error in ")[1]
    assert.matches(" ms trace_id=" .. HEX32, done)
    assert.equal(0, #lines_with(host:log(), host:name("raises"), "served"))
  end)
end)

describe("the access log", function()
  local fx = H.host_fixture { dir = FIXTURE, args = { "--access-log" } }
  local host, client
  setup(function() host, client = fx:start() end)
  teardown(function() fx:stop() end)

  it("writes one line per call: function, outcome, duration and trace id", function()
    client:remote_call(host:name("leaf"), { 1 })
    client:remote_call(host:name("leaf"), { 2 })
    H.expect_error("remote", client.remote_call, client, host:name("raises"), {})
    local leaf = wait_lines(host, 2, " access ", "function=" .. host:name("leaf") .. " ")
    local raised = wait_lines(host, 1, " access ", "function=" .. host:name("raises") .. " ")
    assert.equal(2, #leaf)
    assert.equal(1, #raised)
    for _, line in ipairs(leaf) do
      local f = fields(line)
      assert.equal("ok", f.outcome)
      assert.is_number(tonumber(f.duration_ms))
      assert.matches("^%d+$", f.cid)
      assert.matches("^" .. HEX32 .. "$", f.trace_id)
    end
    assert.equal("remote_error", fields(raised[1]).outcome)
    -- two calls from the main thread: two traces
    assert.are_not.equal(fields(leaf[1]).trace_id, fields(leaf[2]).trace_id)
  end)

  it("says when a call's arguments were refused", function()
    local fx2 = H.start { dir = "spec/fixtures/basic", args = { "--access-log" } }
    H.expect_error("remote", client.remote_call, client, fx2:name("add"), { 1 })
    local line = wait_lines(fx2, 1, " access ", "function=" .. fx2:name("add") .. " ")[1]
    assert.equal("invalid_arguments", fields(line).outcome)
    fx2:stop()
  end)
end)

describe("--log-format json", function()
  local fx = H.host_fixture { dir = FIXTURE, args = { "--log-format", "json", "--access-log" } }
  local host, client
  setup(function() host, client = fx:start() end)
  teardown(function() fx:stop() end)

  it("writes every line as one JSON object, with the call's fields as members", function()
    client:remote_call(host:name("leaf"), { "é\"\n\t\1" })
    H.expect_error("remote", client.remote_call, client, host:name("raises"), { "x" })
    assert.equal("still here", client:remote_call(host:name("log_mistakes"), {}))
    wait_lines(host, 3, '"msg":"access"')
    host:stop()
    local n, access, warn = 0, {}, nil
    for line in host:log():gmatch("[^\n]+") do
      local ok, obj = pcall(cjson.decode, line)
      assert(ok and type(obj) == "table", "not a JSON object: " .. line)
      assert.is_string(obj.time)
      assert.is_string(obj.level)
      assert.is_number(obj.pid)
      assert.is_string(obj.msg)
      n = n + 1
      if obj.msg == "access" then access[obj["function"]] = obj end
      if obj.level == "WARN" and obj.msg:find("raised", 1, true) then warn = obj end
    end
    assert.is_true(n >= 6, "only " .. n .. " lines")
    local leaf = assert(access[host:name("leaf")], "no access line for leaf")
    assert.equal("ok", leaf.outcome)
    assert.is_number(leaf.duration_ms)
    assert.matches("^" .. HEX32 .. "$", leaf.trace_id)
    assert.equal("remote_error", access[host:name("raises")].outcome)
    assert.is_table(warn, "no WARN line for the raising handler")
    assert.matches("^" .. HEX32 .. "$", warn.trace_id)
    -- a handler's own line keeps its characters, escaped, on one line
    assert.matches('leaf got é"\n\t\1', host:log():match('[^\n]*leaf got[^\n]*') and
      cjson.decode(host:log():match('[^\n]*leaf got[^\n]*')).msg, 1, true)
  end)
end)

describe("the log settings in the config file", function()
  teardown(function() H.stop_all() end)

  it("app.access_log and app.log_format do what the options do", function()
    local cfg = H.tmpname("cfg") .. ".lua"
    H.write_file(cfg, 'app = { access_log = true, log_format = "json" }\n')
    local host = H.start { dir = FIXTURE, args = { "-c", cfg } }
    local client = H.client()
    client:remote_call(host:name("leaf"), { 1 })
    client:close()
    wait_lines(host, 1, '"msg":"access"', host:name("leaf"))
    host:stop()
    for line in host:log():gmatch("[^\n]+") do
      assert(pcall(cjson.decode, line), "not JSON: " .. line)
    end
  end)

  it("a log_format that is neither is refused with where it came from", function()
    local cfg = H.tmpname("cfg") .. ".lua"
    H.write_file(cfg, 'app = { log_format = "xml" }\n')
    local res = H.cli { "show-config", "-c", cfg }
    assert.equal(78, res.code)
    assert.matches("log_format must be text or json, got 'xml' (config file)", res.stderr, 1, true)
    assert.equal(78, H.cli({ "show-config", "--log-format", "xml" }).code)
  end)
end)

describe("no password in any log line", function()
  local SECRET = "S3cretPW"
  -- Malformed every way we know: an unencoded '@', no '@' at all, a space,
  -- a bad %-escape, a list of two.
  local urls = {
    "amqp://user:" .. SECRET .. "@@127.0.0.1:1/",
    "amqp://user:" .. SECRET .. "@x@127.0.0.1:1/",
    "amqp://user:" .. SECRET,
    "amqp://user:" .. SECRET .. "@127.0.0.1:notaport/",
    "amqp://user:%zz" .. SECRET .. "@127.0.0.1:1/",
    "amqp://user:" .. SECRET .. "@127.0.0.1:1/ amqp://user:" .. SECRET .. "@@127.0.0.1:2/",
    "amqp://user:" .. SECRET .. " x@127.0.0.1:1/",
  }

  for i, url in ipairs(urls) do
    it("serve, call and show-config with URL #" .. i .. " never show it", function()
      for _, args in ipairs {
        { "serve", "--url", url, FIXTURE },
        { "serve", "--url", url, "--log-format", "json", FIXTURE },
        { "call", "--url", url, "f" },
        { "show-config", "--url", url },
      } do
        local res = H.cli(args)
        local out = res.stdout .. res.stderr
        assert(out ~= "", table.concat(args, " ") .. " printed nothing")
        assert(not out:find(SECRET, 1, true), table.concat(args, " ") .. " showed the password:\n" .. out)
      end
    end)
  end

  it("scripts/run.sh (make run) does not print it", function()
    local res = H.run({ "scripts/run.sh" }, { env = { RABIBRIDGE_URL = urls[1] } })
    local out = res.stdout .. res.stderr
    assert.matches("serving services/ on amqp://user:****@", out, 1, true)
    assert(not out:find(SECRET, 1, true), "run.sh showed the password:\n" .. out)
    res = H.run({ "scripts/run.sh" }, { env = { RABIBRIDGE_URL = urls[3] } })
    assert(not (res.stdout .. res.stderr):find(SECRET, 1, true), "run.sh showed the password:\n" .. res.stderr)
  end)
end)

describe("W3C traceparent", function()
  local fx = H.host_fixture { dir = FIXTURE, args = { "--access-log" } }
  local host, client
  setup(function() host, client = fx:start() end)
  teardown(function() fx:stop() end)

  local TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
  local GIVEN = ("00-%s-%s-01"):format(TRACE, SPAN)

  it("travels from the first caller through a nested call, a new span each, one trace id in the logs", function()
    local r = client:remote_call(host:name("front"), {}, nil, nil, { traceparent = GIVEN })
    -- the call continues the given trace, in a span of its own
    local front_span = r.traceparent:match("^00%-" .. TRACE .. "%-(" .. HEX16 .. ")%-01$")
    assert.is_string(front_span, r.traceparent)
    assert.are_not.equal(SPAN, front_span)
    -- each call the handler makes: the same trace, a new span id of its own
    local spans = { [SPAN] = true, [front_span] = true }
    for _, leaf in ipairs { r.direct, r.spawned } do
      local trace, span = leaf.traceparent:match("^00%-(" .. HEX32 .. ")%-(" .. HEX16 .. ")%-01$")
      assert.equal(TRACE, trace)
      assert.is_nil(spans[span], "a span id used twice: " .. span)
      spans[span] = true
    end
    -- the logs: every line of the three calls carries the trace id
    local front = wait_lines(host, 1, " access ", "function=" .. host:name("front") .. " ")
    local leaves = wait_lines(host, 2, " access ", "function=" .. host:name("leaf") .. " ")
    assert.equal(TRACE, fields(front[1]).trace_id)
    assert.equal(front_span, fields(front[1]).span_id)
    local leaf_spans = {}
    for _, line in ipairs(leaves) do
      assert.equal(TRACE, fields(line).trace_id)
      leaf_spans[fields(line).span_id] = true
    end
    assert.is_true(leaf_spans[r.direct.traceparent:sub(37, 52)])
    assert.is_true(leaf_spans[r.spawned.traceparent:sub(37, 52)])
    -- and the handlers' own rabi.log lines
    assert.equal(TRACE, fields(wait_lines(host, 1, "front calling leaf")[1]).trace_id)
    assert.equal(2, #lines_with(host:log(), "leaf got", "trace_id=" .. TRACE))
  end)

  it("starts a new trace at a caller that has none", function()
    local a = client:remote_call(host:name("leaf"), { "a" })
    local b = client:remote_call(host:name("leaf"), { "b" })
    assert.matches("^00%-" .. HEX32 .. "%-" .. HEX16 .. "%-01$", a.traceparent)
    assert.are_not.equal(a.traceparent:sub(4, 35), b.traceparent:sub(4, 35))
  end)

  it("refuses a traceparent that is not one, before sending anything", function()
    for _, bad in ipairs { "00-" .. TRACE .. "-" .. SPAN, "00-" .. TRACE:upper() .. "-" .. SPAN .. "-01", 42 } do
      H.expect_error("invalid_argument", client.remote_call, client, host:name("leaf"), {}, nil, nil,
        { traceparent = bad })
    end
  end)

  it("core.traceparent continues a valid parent and starts over from anything else", function()
    local core = require "rabibridge.core"
    local child = core.traceparent(GIVEN)
    assert.equal(TRACE, child:sub(4, 35))
    assert.are_not.equal(SPAN, child:sub(37, 52))
    for _, bad in ipairs {
      "00-" .. ("0"):rep(32) .. "-" .. SPAN .. "-01",   -- an all-zero trace id
      "00-" .. TRACE .. "-" .. ("0"):rep(16) .. "-01",  -- an all-zero span id
      "ff-" .. TRACE .. "-" .. SPAN .. "-01",           -- the forbidden version
      "00-" .. TRACE .. "-" .. SPAN .. "-01-extra",     -- version 00 has no more fields
      "00-" .. TRACE:upper() .. "-" .. SPAN .. "-01",   -- upper case
      "garbage",
    } do
      local t = core.traceparent(bad)
      assert.matches("^00%-" .. HEX32 .. "%-" .. HEX16 .. "%-01$", t)
      assert.are_not.equal(TRACE, t:sub(4, 35))
    end
    -- a later version with more fields is continued, as version 00
    assert.equal(TRACE, core.traceparent("01-" .. TRACE .. "-" .. SPAN .. "-01-more"):sub(4, 35))
  end)
end)

-- ---- mistakes caught early ----

-- A folder of service scripts written for one test. -> its path
local function service_dir(files)
  local dir = H.tmpname("svc")
  os.execute("mkdir -p " .. H.quote(dir))
  for name, text in pairs(files) do
    H.write_file(dir .. "/" .. name, "local rabi = require 'rabibridge'\nlocal S = os.getenv('RABI_SPEC_SUFFIX')\n"
      .. text)
  end
  return dir
end

-- Starts serve on dir, expecting it to stop by itself. -> exit code, log
local function serve_fails(dir, args)
  local host = H.start { dir = dir, args = args, wait = false }
  local code = host:wait_exit(20)
  if code == nil then host:stop(2) end
  return code, host:log()
end

describe("mistakes in service scripts", function()
  teardown(function() H.stop_all() end)

  it("a script that fails to load stops serve with its file and line, and status 65", function()
    local dir = service_dir {
      ["a_good.lua"] = "rabi.register_call('good' .. S, {}, function() return 1 end)\n",
      ["b_bad.lua"] = "rabi.register_call('bad' .. S, {}, function() end)\nlocal x = = 1\n",
    }
    local code, log = serve_fails(dir)
    assert.equal(65, code, log)
    assert.matches(dir .. "/b_bad.lua:4:", log, 1, true)
    assert.matches("--keep-going", log, 1, true)
    assert.is_nil(log:find("serving %d+ function"), "it served:\n" .. log)
  end)

  it("with --keep-going serves the scripts that loaded", function()
    local dir = service_dir {
      ["a_good.lua"] = "rabi.register_call('good' .. S, {}, function() return 1 end)\n",
      ["b_bad.lua"] = "error('cannot start: no database')\n",
    }
    local host = H.start { dir = dir, args = { "--keep-going" }, functions = 1 }
    assert.matches(dir .. "/b_bad.lua:3: cannot start: no database", host:log(), 1, true)
    local client = H.client()
    assert.equal(1, client:remote_call(host:name("good"), {}))
    client:close()
    assert.equal(0, host:stop())
  end)

  it("an unknown register_call option names it, the closest option and the line", function()
    local dir = service_dir {
      ["opts.lua"] = "rabi.register_call('f' .. S, { timeot = 5 }, function() end)\n",
    }
    local code, log = serve_fails(dir)
    assert.equal(65, code, log)
    assert.matches(dir .. "/opts.lua:3: register_call('f", log, 1, true)
    assert.matches("unknown option 'timeot' (did you mean 'timeout'?)", log, 1, true)
    -- each option of the issue's example
    local service = require "rabibridge.service"
    for typo, want in pairs { fetch_sise = "fetch_size", queue_szie = "queue_size", re_registr = "re_register",
                              valdiate = "validate", parmas = "params" } do
      local ok, err = pcall(service.register_call, "typo_unit", { [typo] = 1 }, function() end)
      assert.is_false(ok)
      assert.matches(("unknown option '%s' (did you mean '%s'?)"):format(typo, want), err, 1, true)
    end
    service.reset()
  end)

  it("a function registered twice names both places", function()
    local dir = service_dir {
      ["a.lua"] = "rabi.register_call('twice' .. S, {}, function() return 'a' end)\n",
      ["b.lua"] = "\nrabi.register_call('twice' .. S, {}, function() return 'b' end)\n",
    }
    local code, log = serve_fails(dir)
    assert.equal(65, code, log)
    assert.matches(dir .. "/b.lua:4: register_call('twice", log, 1, true)
    assert.matches("is already registered at " .. dir .. "/a.lua:3", log, 1, true)
  end)

  it("the same name with another ftype is another function, not a duplicate", function()
    local dir = service_dir {
      ["a.lua"] = "rabi.register_call('both' .. S, {}, function() return 'async' end)\n"
        .. "rabi.register_call('both' .. S, { ftype = 'sync' }, function() return 'sync' end)\n",
    }
    local host = H.start { dir = dir, functions = 2 }
    local client = H.client()
    assert.equal("sync", client:remote_call(host:name("both"), {}, nil, "sync"))
    assert.equal("async", client:remote_call(host:name("both"), {}))
    client:close()
    host:stop()
  end)
end)

describe("rabi.log", function()
  local fx = H.host_fixture { dir = FIXTURE, args = { "--log-level", "DEBUG" } }
  local host, client
  setup(function() host, client = fx:start() end)
  teardown(function() fx:stop() end)

  it("never raises in a handler, and logs what it was given", function()
    assert.equal("still here", client:remote_call(host:name("log_mistakes"), {}))
    local line = wait_lines(host, 1, "INFO", "%d x [log format error:")[1]
    assert.matches("trace_id=" .. HEX32, line)
    wait_lines(host, 1, "WARN", "%s and %s only one [log format error:")
    wait_lines(host, 1, "ERROR", "nil")
  end)

  it("never raises in a script either", function()
    local script = H.tmpname("logs") .. ".lua"
    H.write_file(script, [[
local rabi = require "rabibridge"
rabi.log.error("%d", "x")
rabi.log.error("%q %q", {})
rabi.log.error(setmetatable({}, { __tostring = function() error("no") end }))
print("survived")
]])
    local res = H.cli { "run", script }
    assert.equal(0, res.code, res.stderr)
    assert.equal("survived\n", res.stdout)
    assert.matches("ERROR [^\n]* %%d x %[log format error:", res.stderr)
  end)
end)

describe("a serialiser mismatch", function()
  it("is named in the error, with what to set", function()
    local suffix = H.new_suffix()
    local cases = {
      { serialiser = "msgpack", reply = "[0, 5]", looks = "json" },
      { serialiser = "json", reply = "\146\0\5", looks = "msgpack" },
    }
    for i, c in ipairs(cases) do
      local name = "mismatch" .. suffix .. i
      local peer = H.raw_serve_once("rpc_async_" .. name, "async_" .. name, c.reply)
      local client = H.client { serialiser = c.serialiser }
      local err = H.expect_error("protocol", client.remote_call, client, name, {})
      client:close()
      local request = assert(peer:result())
      peer:stop()
      -- what a foreign server received: the trace in its header
      assert.matches("^00%-" .. HEX32 .. "%-" .. HEX16 .. "%-01$", request.headers.traceparent)
      assert.equal(err.trace_id, request.headers.traceparent:sub(4, 35))
      assert.matches(("the reply looks like %s and this client speaks %s"):format(c.looks, c.serialiser),
        err.message, 1, true)
      assert.matches("--serialiser", err.message, 1, true)
    end
  end)
end)

-- The trace is the task's (host/task.c), not the coroutine's: a finished
-- task's coroutine is reused by the next task, which must not inherit a
-- trace it does not work for.
describe("a task's trace", function()
  local rabi, trace
  setup(function()
    rabi = H.rabi()
    trace = require "rabibridge.trace"
  end)
  local TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

  it("goes to the tasks it spawns, and never to a later task on its reused coroutine", function()
    for _ = 1, 5 do
      local ok, own, spawned = rabi.wait(rabi.spawn(function()
        trace.set(TP)
        local t = rabi.spawn(function() return rabi.traceparent() end)
        local _, inherited = rabi.wait(t)
        return rabi.traceparent(), inherited
      end))
      assert.is_true(ok)
      assert.equal(TP, own)
      assert.equal(TP, spawned)
      -- the next tasks take the coroutines those two ran on, once their
      -- handles are collected
      collectgarbage()
      collectgarbage()
      assert.same({ true }, { rabi.wait(rabi.spawn(function() return rabi.traceparent() end)) })
      assert.same({ true }, { rabi.wait(rabi.spawn(function() return rabi.traceparent() end)) })
    end
    assert.is_nil(rabi.traceparent()) -- the main thread keeps none
    trace.set(TP)
    assert.is_nil(rabi.traceparent())
  end)
end)

-- Bad input on the wire: raw bodies no rabibridge client would send,
-- published with Python (spec/tools/amqp_raw.py) straight to a service's
-- routing key. Each gets an error reply where one can be sent, the worker
-- serves on, and nothing is left in the queue. README: How it maps to the Python RabiBridge.
local H = require "helper"
local cjson = require "cjson"

describe("malformed requests", function()
  local host, client, results, queue_after
  local cases = {}

  local function case(label, body, reply_to)
    cases[#cases + 1] = { label = label, body = body, reply_to = reply_to }
    return #cases
  end

  local INVALID_JSON = case("invalid JSON", "{not json")
  local OBJECT = case("an object instead of [args, kwargs]", '{"args": [1], "kwargs": {}}')
  local ARGS_NOT_ARRAY = case("args not an array", '[1, 2]')
  local KWARGS_NOT_OBJECT = case("kwargs not an object", '[[1], "k"]')
  local THREE = case("three elements", '[[1], {}, 3]')
  local NULL = case("a JSON null", 'null')
  local EMPTY = case("an empty body", "")
  local BAD_ZSTD = case("a corrupt zstd frame", "\40\181\47\253" .. "garbage that is no zstd frame at all")
  local NO_REPLY_TO = case("no reply_to", '[["lost"], {}]', false)
  local DEEP = case("JSON nested 100000 levels deep", ("["):rep(100000) .. ("]"):rep(100000))
  local BAD_UTF8 = case("a string that is not UTF-8", '[["\255\254"], {}]')
  local TRUNCATED_ZSTD -- filled in setup, from the zstd tool
  local GOOD = case("a good request after the bad ones", '[["fine"], {}]')

  -- Replies to bodies that are neither json nor msgpack come in the
  -- configured serialiser: json here, so that they read as text.
  local fx = H.host_fixture { dir = "spec/fixtures/basic", args = { "--serialiser", "json" } }

  setup(function()
    host, client = fx:start()
    -- A real zstd frame cut in half.
    local plain = H.tmpname("big") .. ".json"
    H.write_file(plain, '[["' .. ("abcdefgh"):rep(500) .. '"], {}]')
    local z = H.run { "zstd", "-q", "-c", plain }
    assert(z.code == 0, z.stderr)
    table.insert(cases, #cases, { label = "a truncated zstd frame", body = z.stdout:sub(1, math.floor(#z.stdout / 2)) })
    TRUNCATED_ZSTD = #cases - 1
    GOOD = #cases
    for _, c in ipairs(cases) do c.routing_key = "async_" .. host:name("echo") end
    results = H.raw_publish(cases, 5)
  end)

  teardown(function() fx:stop() end)

  -- -> err_code, message of the reply to case i (asserting there is one)
  local function reply(i)
    local r = results[i]
    assert.is_true(r.replied, "no reply to " .. cases[i].label)
    local ok, v = pcall(cjson.decode, r.body)
    assert.is_true(ok, "the reply to " .. cases[i].label .. " is not JSON: " .. tostring(r.body))
    assert.is_table(v)
    return v[1], v[2]
  end

  local function assert_error_reply(i, ...)
    local code, message = reply(i)
    assert.equal(1, code, "reply to " .. cases[i].label .. ": " .. tostring(message))
    assert.is_string(message)
    local lower = message:lower()
    local found = false
    for _, word in ipairs { ... } do
      if lower:find(word, 1, true) then found = true end
    end
    assert.is_true(found, ("the reply to %s does not say what was wrong: %s"):format(cases[i].label, message))
  end

  it("invalid JSON gets an error reply saying the body is malformed", function()
    assert_error_reply(INVALID_JSON, "malformed", "json", "parse", "decode")
  end)

  it("a refusal is logged at WARN with the request's cid and trace id", function()
    local cid = tostring(1000 + ARGS_NOT_ARRAY)
    local line = H.wait_until(function()
      return host:log():match("[^\n]*WARN[^\n]*: refused cid " .. cid .. ": [^\n]*")
    end, 5)
    assert.is_string(line, host:log())
    assert.matches("args must be an array", line, 1, true)
    assert.matches("trace_id=" .. ("%x"):rep(32), line)
  end)

  it("an object instead of [args, kwargs] gets an error reply", function()
    assert_error_reply(OBJECT, "[args, kwargs]", "args")
  end)

  it("args that are not an array get an error reply", function()
    assert_error_reply(ARGS_NOT_ARRAY, "args")
  end)

  it("kwargs that are not an object get an error reply", function()
    assert_error_reply(KWARGS_NOT_OBJECT, "kwargs")
  end)

  it("a request of three elements gets an error reply", function()
    assert_error_reply(THREE, "[args, kwargs]", "args")
  end)

  it("a JSON null gets an error reply", function()
    assert_error_reply(NULL, "[args, kwargs]", "malformed")
  end)

  it("an empty body gets an error reply", function()
    assert_error_reply(EMPTY, "malformed", "empty", "json")
  end)

  it("a corrupt zstd frame gets an error reply saying it cannot be decompressed", function()
    assert_error_reply(BAD_ZSTD, "decompress")
  end)

  it("a truncated zstd frame gets an error reply saying it cannot be decompressed", function()
    assert_error_reply(TRUNCATED_ZSTD, "decompress", "truncated")
  end)

  it("JSON nested 100000 levels deep gets an error reply", function()
    assert_error_reply(DEEP, "malformed", "deep", "nest", "depth")
  end)

  it("a string that is not UTF-8 gets an error reply or comes back as sent", function()
    local code, result = reply(BAD_UTF8)
    if code == 0 then
      assert.equal("\255\254", result)
    else
      assert.equal(1, code)
      assert.is_string(result)
    end
  end)

  it("a request without reply_to gets no reply and is logged", function()
    assert.is_false(results[NO_REPLY_TO].replied)
    assert.matches("without reply_to", host:log(), 1, true)
  end)

  it("9,000 arguments get an error reply naming the limit, not a timeout", function()
    local args = {}
    for i = 1, 9000 do args[i] = i end
    local e = H.expect_error("remote", client.remote_call, client, host:name("echo"), args, nil, nil, { timeout = 10 })
    assert.matches("9000 arguments: a function takes at most 7000", e.message, 1, true)
  end)

  it("a good raw request after the bad ones is served", function()
    local code, result = reply(GOOD)
    assert.equal(0, code)
    assert.equal("fine", result)
  end)

  it("the worker still serves the Lua client afterwards", function()
    assert.equal("after", client:remote_call(host:name("echo"), { "after" }))
    assert.equal(5, client:remote_call(host:name("add"), { 2, 3 }))
  end)

  it("leaves no message ready or unacknowledged in the queue", function()
    local q
    H.wait_until(function()
      q = H.queues()["rpc_async_" .. host:name("echo")]
      return q and q.messages_ready == 0 and q.messages_unacknowledged == 0
    end, 5, 0.5)
    assert.is_table(q)
    assert.equal(0, q.messages_ready)
    assert.equal(0, q.messages_unacknowledged)
  end)

  it("the host process is still the one that started", function()
    assert.is_true(host:alive())
    assert.not_matches("exited with status", host:log())
    assert.not_matches("killed by signal", host:log())
  end)
end)

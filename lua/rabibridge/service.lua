-- register_call and the per-function dispatcher that the C server runs in a
-- coroutine for every request: decode, bind kwargs to positions, check the
-- arguments, run the handler, encode the reply. Everything that can fail is
-- caught here, so every request gets a reply.
local core = require "rabibridge.core"
local serial = require "rabibridge.serial"
local errors = require "rabibridge.errors"
local wire = require "rabibridge.wire"
local suggest = require "rabibridge.suggest"
local trace = require "rabibridge.trace"

local M = {}

M.registered = {}      -- in registration order
M.by_queue = {}

local TYPES = { number = true, integer = true, string = true, boolean = true, table = true, any = true }

local function parse_params(name, params)
  if params == nil then return nil end
  if type(params) ~= "table" then
    error(("register_call('%s'): params must be an array of 'name[:type][?]' strings"):format(name), 3)
  end
  local out = {}
  for i, p in ipairs(params) do
    if type(p) ~= "string" then
      error(("register_call('%s'): params[%d] must be a string like 'a:number'"):format(name, i), 3)
    end
    local pname, ptype = p:match("^([%a_][%w_]*)%s*:?%s*([%a]*%??)$")
    if not pname then
      error(("register_call('%s'): params[%d] '%s' is not 'name[:type][?]'"):format(name, i, p), 3)
    end
    local optional = false
    if ptype:sub(-1) == "?" then
      optional, ptype = true, ptype:sub(1, -2)
    end
    if ptype == "" then ptype = "any" end
    if not TYPES[ptype] then
      error(("register_call('%s'): unknown type '%s' in params[%d] (expected number, integer, string, boolean, table or any)")
        :format(name, ptype, i), 3)
    end
    out[i] = { name = pname, type = ptype, optional = optional }
  end
  return out
end

-- ---- validate: pydantic's lax mode, for what a Lua type can express ----

local ffi = require "ffi"
local int64_t, uint64_t = ffi.typeof("int64_t"), ffi.typeof("uint64_t")

local function is_int_cdata(v)
  return type(v) == "cdata" and (ffi.istype(int64_t, v) or ffi.istype(uint64_t, v))
end

local function type_of(v)
  if v == serial.null then return "null" end
  local t = type(v)
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return tostring(v) end
    return v % 1 == 0 and "integer" or ("%s (a number with a fraction)"):format(tostring(v))
  end
  if t == "string" then return ("string %q"):format(#v > 40 and v:sub(1, 40) .. "..." or v) end
  if is_int_cdata(v) then return "integer" end
  return t
end

-- pydantic reads " 12 " as an int too, and "1.0" or "12.000", not "1.5".
local function integer_of(s)
  local sign, digits = s:match("^%s*([+-]?)(%d+)%.?0*%s*$")
  if not digits then return nil end
  if #digits <= 15 then return tonumber(sign .. digits) end
  -- Beyond a double's 2^53: a 64-bit integer, as the codecs decode one.
  local v, limit = 0ULL, sign == "-" and 9223372036854775808ULL or 18446744073709551615ULL
  for d in digits:gmatch("%d") do
    d = tonumber(d)
    if v > (limit - d) / 10 then return nil end
    v = v * 10 + d
  end
  if sign == "-" then return v <= 9007199254740992ULL and -tonumber(v) or -ffi.cast(int64_t, v) end
  if v <= 9007199254740992ULL then return tonumber(v) end
  return v <= 9223372036854775807ULL and ffi.cast(int64_t, v) or v
end

local function float_of(s)
  local t = s:match("^%s*(.-)%s*$"):lower()
  local body = t:match("^[+-]?(.*)$")
  if body == "inf" or body == "infinity" or body == "nan" then
    if body == "nan" then return 0 / 0 end
    return t:sub(1, 1) == "-" and -math.huge or math.huge
  end
  -- Lua's tonumber also reads hex and would take "0x10"; pydantic does not.
  if not (body:match("^%d+%.?%d*$") or body:match("^%.%d+$")
          or body:match("^%d+%.?%d*e[+-]?%d+$") or body:match("^%.%d+e[+-]?%d+$")) then
    return nil
  end
  return tonumber(t)
end

local BOOL_WORDS = {
  ["0"] = false, off = false, f = false, ["false"] = false, n = false, no = false,
  ["1"] = true, on = true, t = true, ["true"] = true, y = true, yes = true,
}

-- The value the handler gets for a parameter of type ptype, converted as
-- pydantic's lax mode converts it (a numeric string to a number, an
-- integral float to an integer, 0/1 and "yes"/"no" to a boolean, a
-- boolean to 1/0), or nil when it refuses.
local function coerce(v, ptype)
  if ptype == "any" then return v end
  local t = type(v)
  if ptype == "number" then
    if t == "number" or is_int_cdata(v) then return v end
    if t == "boolean" then return v and 1 or 0 end
    if t == "string" then return float_of(v) end
  elseif ptype == "integer" then
    if t == "number" then
      if v % 1 == 0 and v - v == 0 then return v end -- not a fraction, NaN or infinite
      return nil
    end
    if is_int_cdata(v) then return v end
    if t == "boolean" then return v and 1 or 0 end
    if t == "string" then return integer_of(v) end
  elseif ptype == "boolean" then
    if t == "boolean" then return v end
    if t == "number" and (v == 0 or v == 1) then return v == 1 end
    if t == "string" then return BOOL_WORDS[v:lower()] end
  elseif t == ptype then
    return v -- string and table: no conversion
  end
  return nil
end
M.coerce = coerce

-- Binds kwargs to positions and checks arity (and types with validate).
-- -> argv, n | nil, message
local null = serial.null

local function bind(spec, args, kwargs)
  local params = spec.params
  local n = #args
  -- Top-level nulls arrive as nil, as a Lua function expects a missing value.
  local argv = {}
  for i = 1, n do
    local v = args[i]
    if v ~= null then argv[i] = v end
  end
  if not params then
    if next(kwargs) ~= nil then
      return nil, ("%s takes no keyword arguments (declare params to accept them)"):format(spec.name)
    end
    return argv, n
  end
  if n > #params then
    return nil, ("%s takes at most %d argument%s but %d were given")
      :format(spec.name, #params, #params == 1 and "" or "s", n)
  end
  for key, v in pairs(kwargs) do
    local pos = spec.param_pos[key]
    if not pos then
      return nil, ("%s got an unexpected keyword argument '%s'"):format(spec.name, tostring(key))
    end
    if pos <= n then
      return nil, ("%s got multiple values for argument '%s'"):format(spec.name, key)
    end
    if v ~= null then argv[pos] = v end
  end
  local last = n
  for i, p in ipairs(params) do
    local v = argv[i]
    if v == nil then
      if not p.optional then
        return nil, ("%s missing required argument '%s' (position %d)"):format(spec.name, p.name, i)
      end
    else
      if i > last then last = i end
      if spec.validate then
        local value = coerce(v, p.type)
        if value == nil then
          return nil, ("%s: argument '%s' must be %s, got %s"):format(spec.name, p.name, p.type, type_of(v))
        end
        argv[i] = value
      end
    end
  end
  return argv, last
end
M.bind = bind

local traceback = debug.traceback
local unpack = unpack
-- unpack gives at most LuaJIT's C stack limit (8000) values, and raises
-- outside the handler's xpcall above it.
local MAX_ARGS = 7000

-- The traceback stops at the handler: the dispatcher's own frames below it
-- say nothing to the caller.
local function describe(e)
  if type(e) ~= "table" or errors.is_error(e) then return tostring(e) end
  local mt = getmetatable(e)
  if mt and mt.__tostring then return tostring(e) end
  -- A plain table raised as an error: say what it holds.
  local text = core.json_encode(e)
  return "error object: " .. (text or tostring(e))
end
M.describe_error = describe

local function on_handler_error(e)
  local tb = traceback(describe(e), 2)
  return (tb:gsub("\n%s*%[C%]: in function 'xpcall'.*$", ""))
end

-- What came of a call, for the server's log (host/server.c adds those it
-- decides itself: expired, requeued, failed).
local OK, REMOTE_ERROR, INVALID, REFUSED = "ok", "remote_error", "invalid_arguments", "refused"

-- A handler that raised: the operator's log says so at WARN (its first
-- line), and gives the traceback at DEBUG, both with the call's trace id.
local function log_handler_error(name, text)
  local cid = tostring(core.task_cid())
  local fields = { trace_id = trace.id(trace.current()) }
  core.log("WARN", ("%s: cid %s raised: %s"):format(name, cid, text:match("^[^\n]*")), fields)
  if core.log_enabled("DEBUG") then
    core.log("DEBUG", ("%s: cid %s: %s"):format(name, cid, text), fields)
  end
end

-- A server answers each request in the serialiser it came in (serial.detect);
-- this one, which the worker sets from the settings before it loads the
-- service scripts, is only for a body that is neither.
M.serialiser = serial.default

local detect = serial.detect

-- The dispatcher host/server.c runs in a task for each request:
-- (body, decode_error, refusal) -> reply body, outcome, in a task that
-- works for the request's trace and correlation id (trace.current(),
-- core.task_cid()).
-- refusal: the host answers this request with an error instead of running
-- it (it killed its worker too often: host/watchdog.c).
local function make_dispatch(spec)
  local fn = spec.fn
  local name = spec.name
  local function reply(codec, ok, ...)
    if not ok then
      local text = ...
      log_handler_error(name, tostring(text))
      return codec.encode_error(text), REMOTE_ERROR
    end
    return codec.encode_result(...), OK
  end
  local function refuse(codec, why)
    core.log("WARN", ("%s: refused cid %s: %s"):format(name, tostring(core.task_cid()), why),
      { trace_id = trace.id(trace.current()) })
    return codec.encode_error(why), REFUSED
  end
  local function call(codec, body)
    local args, kwargs = codec.decode_request(body)
    if not args then return refuse(codec, kwargs) end
    local argv, n = bind(spec, args, kwargs)
    if not argv then return codec.encode_error(n), INVALID end
    if n > MAX_ARGS then
      return codec.encode_error(("%d arguments: a function takes at most %d"):format(n, MAX_ARGS)), INVALID
    end
    return reply(codec, xpcall(fn, on_handler_error, unpack(argv, 1, n)))
  end
  -- Without params a request binds nothing: its args go straight from the
  -- body to the handler (call_args), and any other shape to call, which
  -- says what is wrong with it.
  local function call_plain(codec, body, plain, ...)
    if not plain then return call(codec, body) end
    return reply(codec, xpcall(fn, on_handler_error, ...))
  end
  local plain = not spec.params
  local function serve(body, decode_error, refusal)
    if not body then return serial.get(M.serialiser).encode_error(decode_error), REFUSED end -- logged in C
    local codec, unknown = detect(body)
    if not codec then return refuse(serial.get(M.serialiser), unknown) end
    if refusal then return codec.encode_error(refusal), REFUSED end -- logged in C
    local call_args = codec.call_args
    if plain and call_args then return call_plain(codec, body, call_args(body)) end
    return call(codec, body)
  end
  -- The handler's own calls and log lines belong to the caller's trace:
  -- the server gave the task it runs in that trace.
  return serve
end

-- register_call's options: RabiBridge's, and ftype, params, auto_delete,
-- queue_type, delivery_limit.
M.options = {
  queue_size = true, fetch_size = true, timeout = true, validate = true, re_register = true,
  ftype = true, params = true, auto_delete = true, queue_type = true, delivery_limit = true,
}

-- "file:line" of the code that called register_call.
local function caller_position()
  local info = debug.getinfo(3, "Sl")
  return info and ("%s:%d"):format(info.short_src, info.currentline or 0) or "?"
end

-- The reply to a request that is answered without being run: it timed
-- out in its queue, or reached a worker past its caller's deadline. The
-- C server also sends `why` in a header, from which a rabihost client
-- reports kind timeout; a Python client sees this body, an error reply.
-- (body, decode_error, why) -> reply body, outcome, as a dispatcher; the
-- outcome is "expired", as the access log names it.
function M.answer_timeout(body, _, why)
  local codec = body and detect(body) or serial.get(M.serialiser)
  return codec.encode_error("rabibridge timeout: " .. why), "expired"
end

function M.register_call(name, opts, fn)
  if type(opts) == "function" and fn == nil then opts, fn = {}, opts end
  if type(name) ~= "string" or not name:match("^[%w_%.%-:]+$") or #name > 200 then
    error("register_call: name must be a non-empty string of letters, digits, '_', '.', '-' or ':'", 2)
  end
  if type(opts) ~= "table" then error(("register_call('%s'): options must be a table"):format(name), 2) end
  -- A misspelt option would otherwise be ignored, and its setting with it.
  for key in pairs(opts) do
    if not M.options[key] then
      error(("register_call('%s'): unknown option '%s'%s"):format(name, tostring(key),
        suggest.hint(tostring(key), M.options)), 2)
    end
  end
  if type(fn) ~= "function" then error(("register_call('%s'): the handler must be a function"):format(name), 2) end
  local ftype = opts.ftype or "async"
  if ftype ~= "async" and ftype ~= "sync" then
    error(("register_call('%s'): ftype must be 'async' or 'sync'"):format(name), 2)
  end
  for _, key in ipairs { "queue_size", "fetch_size", "timeout" } do
    local v = opts[key]
    if v ~= nil and (type(v) ~= "number" or v <= 0) then
      error(("register_call('%s'): %s must be a positive number"):format(name, key), 2)
    end
  end
  if opts.timeout and opts.timeout % 1 ~= 0 then
    -- RabiBridge's timeout is whole seconds (x-message-ttl = timeout * 1000):
    -- no Python server can declare this queue's TTL, so none can share it.
    core.log("WARN", ("register_call('%s'): timeout %s is not whole seconds; a Python RabiBridge server"
      .. " cannot declare the same queue (x-message-ttl %d ms) to serve it alongside")
      :format(name, tostring(opts.timeout), math.floor(opts.timeout * 1000)))
  end
  local queue_type = opts.queue_type
  if queue_type ~= nil and queue_type ~= "classic" and queue_type ~= "quorum" then
    error(("register_call('%s'): queue_type must be 'classic' or 'quorum', got %s"):format(name,
      tostring(queue_type)), 2)
  end
  local limit = opts.delivery_limit
  if limit ~= nil and (type(limit) ~= "number" or limit < 0 or limit % 1 ~= 0 or limit > 1000000) then
    error(("register_call('%s'): delivery_limit must be a whole number from 0 to 1000000, got %s"):format(name,
      tostring(limit)), 2)
  end
  if queue_type == "quorum" and opts.auto_delete then
    error(("register_call('%s'): a quorum queue cannot be auto_delete (RabbitMQ refuses it);"
      .. " drop auto_delete or use queue_type = 'classic'"):format(name), 2)
  end
  if opts.fetch_size and opts.fetch_size > 65535 then
    -- basic.qos carries the prefetch count in 16 bits.
    error(("register_call('%s'): fetch_size must be at most 65535 (AMQP's prefetch limit), got %s")
      :format(name, tostring(opts.fetch_size)), 2)
  end
  local params = parse_params(name, opts.params)
  local spec = {
    name = name, ftype = ftype, fn = fn,
    queue = wire.queue(ftype, name),
    routing_key = wire.routing_key(ftype, name),
    queue_size = opts.queue_size and math.floor(opts.queue_size),
    fetch_size = opts.fetch_size and math.floor(opts.fetch_size),
    ttl_ms = opts.timeout and math.floor(opts.timeout * 1000),
    validate = opts.validate and true or false,
    re_register = opts.re_register and true or false,
    -- true: RabiBridge's auto-delete queue, which a Python server can
    -- share, and which goes with its last consumer, the calls waiting in
    -- it too. nil: the setting app.queue_auto_delete (false: durable).
    auto_delete = opts.auto_delete,
    -- nil: the app's (app.queue_type, app.delivery_limit), set by the worker.
    queue_type = queue_type,
    delivery_limit = limit,
    params = params, param_pos = {},
    source = debug.getinfo(2, "S").short_src,
    position = caller_position(),
  }
  if spec.validate and not params then
    error(("register_call('%s'): validate needs params with types"):format(name), 2)
  end
  for i, p in ipairs(params or {}) do spec.param_pos[p.name] = i end
  spec.dispatch = make_dispatch(spec)
  local old = M.by_queue[spec.queue]
  if old then
    -- Two handlers for one queue: only one could serve, and which one would
    -- depend on the order the scripts load in.
    error(("register_call('%s'): %s function '%s' is already registered at %s; give one of them"
      .. " another name (or ftype)"):format(name, ftype, name, old.position), 2)
  end
  M.by_queue[spec.queue] = spec
  M.registered[#M.registered + 1] = spec
  return spec
end

function M.reset()
  M.registered, M.by_queue = {}, {}
end

return M

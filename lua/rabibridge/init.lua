--- RPC over RabbitMQ for Lua, wire-compatible with the Python RabiBridge.
-- Services call register_call; clients call remote_call. Calls that wait
-- yield inside a coroutine of the host and block outside one.
--
-- local rabi = require "rabibridge"
--
-- Inside rabihost (a service, `rabihost run`, the REPL) the module is
-- built in; from plain luajit it is found where `make install`, the rock or
-- the Debian package put it.
--
-- Failures of calls are error values (see rabibridge.errors): tables with a
-- kind and a message. Mistakes in arguments to the functions below (a
-- name that is not a string, options that are not a table) raise plain
-- Lua errors at the caller's line instead.
-- @module rabibridge
local core = require "rabibridge.core"
local serial = require "rabibridge.serial"
local errors = require "rabibridge.errors"
local service = require "rabibridge.service"
local config = require "rabibridge.config"
local trace = require "rabibridge.trace"

local M = {}

--- The version of rabibridge, "MAJOR.MINOR.PATCH".
-- @field version

--- JSON null (msgpack nil) inside a table, where Lua's nil cannot be.
-- A top-level null (an argument, a result) is nil instead.
-- @field null

--- An empty array: sent as [] where an empty table would be {}.
-- @field empty_array

--- A table every service of one worker process shares (RabiBridge's Store):
-- connections, caches, counters. Each worker has its own.
-- @field store

--- The error values module, rabibridge.errors.
-- @field errors

--- Whether a value is one of rabibridge's error values.
-- @function is_error
-- @param v any value
-- @treturn boolean

M.version = core.version
M.null = serial.null
M.empty_array = setmetatable({}, serial.array_mt)
M.store = {}
M.errors = errors
M.is_error = errors.is_error

--- Marks a table as an array, so that it is sent as one even when empty.
-- Arrays decoded from the wire are marked already.
-- @tparam[opt] table t the table (a new one when nil)
-- @treturn table t, marked
-- @usage client:remote_call("sum", { rabi.array{} })   -- sends [[]]
function M.array(t)
  return setmetatable(t or {}, serial.array_mt)
end

-- ---- services ----

--- Registers fn as the remote function name, in a service script.
-- The function is served on the queue rpc_FTYPE_NAME when rabihost serves
-- the script. Arguments arrive as Lua values (keyword arguments bound to
-- positions by params); what fn returns is the reply (several values: an
-- array of them). When fn raises, the caller gets a remote error with the
-- message and the traceback.
-- @function register_call
-- @tparam string name the function's name: letters, digits, _ . - or :
-- @tparam[opt] table opts the options:
--
--  * queue_size (number): calls that may wait in the queue; beyond it a call
--    is refused at once, the caller getting queue_full
--  * fetch_size (number): calls of this function one worker runs at the
--    same time (at most 65535)
--  * timeout (number): seconds a call may wait in the queue; then its
--    caller is answered with an error of kind timeout
--  * validate (boolean): check the types of params before fn runs
--  * params (table): the parameters, "name", "name:type" or "name:type?"
--    (optional); types number, integer, string, boolean, table, any
--  * ftype ("async" or "sync"): RabiBridge's function type, part of the
--    queue's name (default "async")
--  * re_register (boolean): declare the queue again with other arguments
--  * queue_type ("classic" or "quorum"): a quorum queue is replicated over
--    a cluster's nodes (default app.queue_type, "classic"); it cannot be
--    auto_delete
--  * delivery_limit (number): on a quorum queue, the broker's delivery
--    count past which a request is refused with an error: this many, plus
--    3 for requeues after lost connections (default app.delivery_limit, 2;
--    0: none). Deaths of the worker running a request are counted on every
--    queue type by the supervisor, against app.delivery_limit.
-- @tparam function fn the handler; it may be given in place of opts
-- @treturn table the registration (its queue, name, ftype...)
-- @raise a Lua error naming the bad option, when an option is invalid
-- @usage rabi.register_call("add", { params = { "a:number", "b:number" }, validate = true },
--   function(a, b) return a + b end)

M.register_call = service.register_call

--- The HTTP gateway's routes: rabi.http.route("GET /path", function(req)
-- ... end) in a service script adds a route to the gateway of the workers
-- that load it (rabihost gateway, or http.listen beside serve). See
-- rabibridge.gateway's route for the request and the answer.
-- @table http
-- @field route rabibridge.gateway.route
M.http = { route = require("rabibridge.gateway").route }

local start_hooks = {}
M._start_hooks = start_hooks
--- Runs fn once in each worker, after the service scripts load and before
-- the worker consumes. If fn raises, the worker stops (rabihost exits with
-- status 3 at start).
-- @tparam function fn the hook
-- @raise a Lua error when fn is not a function
function M.on_start(fn)
  if type(fn) ~= "function" then error("on_start: expected a function", 2) end
  start_hooks[#start_hooks + 1] = fn
end

-- ---- the loop ----

--- Waits seconds. Inside a coroutine of the host (a handler, a spawned task)
-- it yields, so other calls run meanwhile; on the main thread it runs the
-- event loop until the time is up. Code after a sleep counts on the time
-- having passed, so a cancelled sleep (the worker stopping, the caller's
-- deadline gone) raises its error.
-- @tparam number seconds a non-negative number of seconds
-- @raise a Lua error when seconds is negative or not a number; an error
-- value of kind cancelled when the wait was cancelled
function M.sleep(seconds)
  local ok, err = core.sleep(seconds)
  if not ok then error(err, 0) end
end

--- Monotonic time in seconds, to the microsecond: for measuring durations.
-- @function now
-- @treturn number seconds since an arbitrary point
M.now = core.now

--- Runs fn(...) in a new task (a coroutine of the host), so that its calls
-- wait concurrently with the caller's. The task runs at once until it first
-- waits, then the caller goes on. A task that fails and is never waited for
-- is logged.
-- @tparam function fn the task's body
-- @param ... its arguments
-- @return a task handle, for rabi.wait (or task:wait()); task:status() is
-- "running", "done" or "failed"; task:cancel() cancels its current wait and
-- every later one (they fail with an error value of kind cancelled)
-- @raise a Lua error when fn is not a function
-- @usage local t = rabi.spawn(function() return client:remote_call("add", { 1, 2 }) end)
-- local ok, sum = rabi.wait(t)
function M.spawn(fn, ...)
  if type(fn) ~= "function" then error("spawn: expected a function", 2) end
  -- A task a handler starts works for the same call: core.spawn gives it
  -- the same trace.
  return core.spawn(fn, ...)
end

--- The W3C traceparent of the call the running code serves (a handler,
-- or a task it spawned), for passing the trace on to other systems (an
-- HTTP call's traceparent header). Calls made with a client continue it
-- by themselves.
-- @treturn string|nil "00-TRACEID-SPANID-FLAGS", or nil outside a call
function M.traceparent()
  return trace.current()
end

--- Waits for a task of rabi.spawn to finish, yielding inside a task and
-- running the loop on the main thread.
-- @function wait
-- @param task a handle from rabi.spawn
-- @treturn boolean true when the task returned, false when it raised, nil
-- when this wait itself was cancelled
-- @return its results, or the error it raised (an error value for a failed
-- call), or an error value of kind cancelled
M.wait = core.wait

-- ---- coroutines that may wait ----

local co_create, co_resume = coroutine.create, core.co_resume

-- As LuaJIT's wrap: a string error gets the position of the wrap's caller.
local function wrap_results(ok, ...)
  if ok then return ... end
  local err = ...
  if type(err) == "string" then error(err, 2) end
  error(err, 0)
end

--- The coroutine library, for coroutines that wait. Inside a task (a
-- handler, rabi.spawn) the stock coroutine.resume runs its coroutine inside
-- the C call, so a wait there (rabi.sleep, a remote call, rabi.wait) could
-- neither yield to the event loop nor block; these let it. A wait anywhere in
-- a task's coroutines parks the whole task in the event loop, and wakes the
-- coroutine that waited; coroutine.yield still returns to its resume, and
-- errors reach the resumer as in plain Lua. Outside a task they behave as the
-- stock ones. rabihost (serve, run, repl) makes them the global coroutine's,
-- so handlers and scripts just use coroutine.wrap; from plain luajit, use
-- them in place of coroutine's (a stock resume inside a task refuses waits).
-- create, yield, running and isyieldable are the stock functions.
-- @table coroutine
-- @field resume coroutine.resume(co, ...)
-- @field wrap coroutine.wrap(fn)
-- @field status coroutine.status(co): a coroutine parked in a wait, or a
-- task's own, is "normal" to the others, never "suspended"
-- @usage local coroutine = rabi.coroutine
-- for page in coroutine.wrap(function() ... coroutine.yield(client.fn.page(i)) ... end) do ... end
M.coroutine = {
  create = coroutine.create, yield = coroutine.yield, running = coroutine.running,
  isyieldable = coroutine.isyieldable, resume = co_resume, status = core.co_status,
}

function M.coroutine.wrap(fn)
  if type(fn) ~= "function" then
    error("bad argument #1 to 'wrap' (function expected, got " .. type(fn) .. ")", 2)
  end
  local co = co_create(fn)
  return function(...) return wrap_results(co_resume(co, ...)) end
end

-- rabihost calls this once, before any script loads: handlers and scripts
-- are plain Lua files that call coroutine.wrap. The table itself is
-- patched, so that package.loaded.coroutine and copies of it agree.
function M._install_coroutine()
  for k, v in pairs(M.coroutine) do coroutine[k] = v end
end

-- ---- logging ----

-- A format that does not fit its arguments: the format and the arguments as
-- they are, rather than an error in the code that only wanted to log.
local function unformatted(fmt, err, ...)
  local parts = { tostring(fmt) }
  for i = 1, select("#", ...) do
    local ok, s = pcall(tostring, (select(i, ...)))
    parts[#parts + 1] = ok and s or "?"
  end
  return ("%s [log format error: %s]"):format(table.concat(parts, " "), tostring(err))
end

local function message(fmt, ...)
  if select("#", ...) == 0 then
    local ok, s = pcall(tostring, fmt)
    return ok and s or "?"
  end
  local ok, s = pcall(string.format, fmt, ...)
  if ok then return s end
  return unformatted(fmt, s, ...)
end

-- Logging never raises: a handler that logs must not fail for it.
local function logger(level)
  return function(fmt, ...)
    if not core.log_enabled(level) then return end
    local traceparent = trace.current()
    core.log(level, message(fmt, ...), traceparent and { trace_id = trace.id(traceparent) } or nil)
  end
end
--- The host's logger: one line on stderr with the time, the level and the
-- worker. Each of debug, info, warn and error takes a format and its
-- arguments, as string.format does (a lone argument is printed with
-- tostring). Lines below the log level (--log-level, app.log_level) cost
-- nothing. Logging never raises: a format that does not fit its arguments
-- logs them as they are. Inside a handler each line carries the call's
-- trace id.
-- @table log
-- @field debug log.debug(fmt, ...)
-- @field info log.info(fmt, ...)
-- @field warn log.warn(fmt, ...)
-- @field error log.error(fmt, ...)
-- @usage rabi.log.info("order %s: %d items", id, n)
M.log = { debug = logger "DEBUG", info = logger "INFO", warn = logger "WARN", error = logger "ERROR" }

-- ---- the client ----

--- A connection to the broker that calls remote functions. Make one with
-- rabi.client.
-- @type Client
local Client = {}
Client.__index = Client

local request, count_call = core.client_request, core.metrics_client_call

-- A reply core.client_request did not take (not the plain [code, result]
-- shape, or not in this client's serialiser): decoded here, where the
-- codec says what is wrong with it.
local function general_reply(codec, name, body, traceparent)
  local code, result = codec.decode_reply(body)
  if code == nil then
    count_call("protocol")
    return false, 1, errors.new("protocol", result, { func = name, trace_id = trace.id(traceparent) })
  end
  count_call(code and "ok" or "remote_error")
  if code then return true, 0, result end
  return true, 1, result, traceparent
end

-- Every call path ends here: the C client checks the arguments, writes the
-- request, waits and reads the reply (host/client.c), and counts the call
-- for the host's metrics. -> true, err_code, result [, traceparent] |
-- false, 1, error value
local function call(self, name, args, kwargs, ftype, opts)
  local success, err_code, result, traceparent = request(self._core, name, args, kwargs, ftype, opts, self.timeout)
  if success == nil then return general_reply(self.codec, name, err_code, result) end
  return success, err_code, result, traceparent
end

--- Calls the remote function name and returns its result. Raises an error
-- value on failure, of kind:
--
--  * remote: the function raised (RabiBridge's RemoteExecutionError), or
--    refused its arguments (its params); the error's traceback field holds
--    the remote traceback
--  * timeout: no reply within the timeout, or the request expired before a
--    worker took it (the message names the queue)
--  * queue_full: the function's queue is full (its queue_size), refused at once
--  * no_route: no such function is served
--  * connection: not connected, or the connection dropped during the call
--    after the broker had accepted the request
--  * not_accepted: the connection dropped before the broker confirmed the
--    request: it never took charge of it, and sending it again is safe
--    unless the function must not run twice
--  * invalid_argument: a bad argument to remote_call itself (name, args,
--    kwargs, ftype, opts), or a value that cannot be sent
--  * protocol: a reply that is not RabiBridge's format (for example from a
--    peer with another serialiser)
--  * cancelled: inside a handler, the call it serves passed its deadline, or
--    the worker's drain ran out of time, while this call waited
-- @tparam string name the function's name
-- @tparam[opt] table args the positional arguments, an array
-- @tparam[opt] table kwargs keyword arguments, a table with string keys
-- @tparam[opt="async"] string ftype "async" or "sync"
-- @tparam[opt] table opts per-call options: timeout (seconds; 0 or
-- math.huge: no limit; the client's when not given), traceparent (a W3C
-- traceparent whose trace the call continues; by default a handler's calls
-- continue the trace of the call it serves, and other calls start a trace
-- each)
-- @return the function's result (nil for null)
-- @raise an error value (rabibridge.errors)
-- @usage local sum = client:remote_call("add", { 2, 3 })
function Client:remote_call(name, args, kwargs, ftype, opts)
  local success, err_code, result, traceparent = call(self, name, args, kwargs, ftype, opts)
  if not success then error(result, 2) end
  if err_code ~= 0 then
    local text = tostring(result)
    errors.raise("remote", serial.remote_message(text),
      { traceback = text, func = name, trace_id = trace.id(traceparent) })
  end
  return result
end

--- Calls like remote_call but never raises, as RabiBridge's try_remote_call.
-- @tparam string name the function's name
-- @tparam[opt] table args the positional arguments
-- @tparam[opt] table kwargs keyword arguments
-- @tparam[opt="async"] string ftype "async" or "sync"
-- @tparam[opt] table opts per-call options: timeout (seconds)
-- @treturn boolean success: false when the call failed on this side
-- (timeout, queue_full, no_route, connection, not_accepted,
-- invalid_argument, protocol, cancelled)
-- @treturn number err_code: 0 when result is the function's return value,
-- 1 otherwise
-- @return result: the function's result, the remote error's text (err_code
-- 1, success true), or an error value (success false)
function Client:try_remote_call(name, args, kwargs, ftype, opts)
  local success, err_code, result = call(self, name, args, kwargs, ftype, opts)
  return success, err_code, result
end

--- Connects to the broker (the first of its URLs that answers). A client
-- already connected is returned as is.
-- @treturn Client the client itself, so that rabi.client{...}:connect() works
-- @raise an error value of kind connection when no broker can be reached
function Client:connect()
  if self._core and self._core:is_open() then return self end
  local s = self.settings
  local c, err = core.client_open(s.url, {
    heartbeat = s.heartbeat, connect_timeout = s.connect_timeout, cid_max = s.cid_max,
    compress_threshold = s.compress_threshold, max_body = s.max_body, name = s.connection_name,
    tls = s.tls, serialiser = self.codec.name,
  })
  if not c then error(err, 0) end
  self._core = c
  return self
end

--- Closes the connection. Closing a closed client does nothing.
function Client:close()
  if self._core then self._core:close() end
  self._core = nil
end

-- One line for the REPL and logs: the broker's URL (no password) and the
-- state of the connection.
function Client:__tostring()
  local url = config.mask_url(self.settings.url or ""):gsub(":%*+@", "@")
  return ("<rabibridge client %s %s>"):format(url, self:is_connected() and "connected" or "not connected")
end

--- Whether the client has an open connection.
-- @treturn boolean
function Client:is_connected()
  return self._core ~= nil and self._core:is_open()
end

local function pack_args(...)
  local n = select("#", ...)
  local args = setmetatable({ ... }, serial.array_mt)
  for i = 1, n do
    if args[i] == nil then args[i] = serial.null end
  end
  return args
end

--- Remote functions as fields: client.fn.add(2, 3) is
-- client:remote_call("add", { 2, 3 }), raising as remote_call does. A nil
-- among the arguments is sent as null.
-- @field fn

-- What each client.fn and client.fn.NAME value stands for, so that tools
-- can describe them. Weak both ways: an entry must not keep the client (and
-- through client.fn its own key) alive.
local remote_functions = setmetatable({}, { __mode = "k" })
local WEAK_VALUES = { __mode = "v" }

-- client.fn.add(2, 3) is client:remote_call("add", {2, 3}). Each name's
-- function is made once and kept while it is in use.
local function fn_proxy(client)
  local made = setmetatable({}, WEAK_VALUES)
  local proxy = setmetatable({}, {
    __index = function(_, name)
      local f = made[name]
      if not f then
        f = function(...) return client:remote_call(name, pack_args(...)) end
        if type(name) ~= "string" then return f end -- remote_call will say what is wrong
        made[name] = f
        remote_functions[f] = setmetatable({ client = client, name = name }, WEAK_VALUES)
      end
      return f
    end,
  })
  remote_functions[proxy] = setmetatable({ client = client }, WEAK_VALUES)
  return proxy
end


--- Discovery: which functions the broker serves.
-- @section discovery

--- The functions served on the broker, as the rabihost hosts serving them
-- describe themselves: what `rabihost list` prints and the REPL completes.
-- Every worker of every rabihost on the broker answers a request on the
-- rpc exchange; the answers are gathered for opts.wait seconds, merged by
-- queue, and each queue's counts asked of the broker. Python RabiBridge
-- servers do not answer: a function only they serve is found by its name
-- (opts.names), with known = false. It opens a short connection of its own
-- with the client's settings, so the client need not be connected.
-- Each function is a table:
--
--  * name (string), ftype ("async" or "sync"), queue (its queue's name)
--  * params: an array of the parameters in register_call's form
--    ("a:number", "b:string?", a bare name for any type), or nil when the
--    function declares none (it takes any arguments) or is not known
--  * validate (boolean), fetch_size (nil: no limit), auto_delete (boolean)
--  * queue_arguments: the queue's x- arguments as declared (x-overflow,
--    x-message-ttl in ms, x-max-length)
--  * consumers, messages: the broker's counts when listed: the queue's
--    consumers (every worker of every host, Python peers included) and the
--    calls waiting in it
--  * hosts: an array of { host =, supervisor = (pid of its rabihost), pid =
--    (of the worker), worker = (its index), version = }, one per worker
--    that answered for it
--  * known: false for a queue found by name that no rabihost described;
--    then only name, ftype, queue, consumers and messages are set
--  * differs: true when workers describe it differently (a rolling
--    upgrade); params and queue_arguments are then the first answer's
-- @tparam Client client a client, whose settings (url, tls) name the broker
-- @tparam[opt] table opts the options:
--
--  * wait (number): seconds to gather answers (default 0.5); a worker whose
--    loop is busy longer is not heard, its consumers still counted
--  * names (table): an array of function names: only these are listed, and
--    their queues (async and sync) are looked up even when no rabihost
--    describes them
-- @treturn table|nil the functions, sorted by name then ftype
-- @treturn table|error { answered = the workers that answered, wait =
-- seconds waited, routed = false when no rabihost listens for discovery on
-- the broker }, or the error value (kind connection)
-- @raise a Lua error naming the argument or option, when client is not a
-- client or opts is malformed
-- @usage for _, f in ipairs(rabi.discover(client)) do print(f.name, f.consumers) end
function M.discover(client, opts)
  return require("rabibridge.discovery").discover(client, opts)
end

--- What a value of client.fn stands for: for client.fn.NAME, a table
-- { client =, name = NAME }; for client.fn itself, { client = }; nil for
-- any other value. The REPL prints them by it.
-- @param v any value
-- @treturn table|nil
function M.remote_function(v)
  return remote_functions[v]
end

--- Making a client.
-- @section client

-- Misuse raises at the caller's line, naming the option: a typo or a
-- value of the wrong type would otherwise fall back to a default silently.
local function check_client_options(opts)
  for k, v in pairs(opts) do
    local want = type(k) == "string" and config.client_options[k]
    if not want then
      error(("client: unknown option '%s'%s"):format(tostring(k),
        require("rabibridge.suggest").hint(k, config.client_options)), 3)
    end
    local got = type(v)
    if want ~= "any" and not want:find(got, 1, true) then
      error(("client: option '%s': %s expected, got %s"):format(k, want, got), 3)
    end
  end
end

--- Makes a client; call :connect() on it before calling. Settings come from
-- opts, then the flags rabihost was given, the environment (RABIBRIDGE_URL,
-- RABBITMQ_HOST...), the config file, then amqp://guest:guest@localhost:5672/.
-- @tparam[opt] table opts the options:
--
--  * url (string or table): the broker, amqp://user:password@host:port/vhost
--    or amqps://; a list of them (a cluster's nodes), or several separated
--    by spaces, are tried in turn from a random one
--  * timeout (number): the default timeout of calls, in seconds; when not
--    given, the setting app.call_timeout (30 s unless configured). 0 or
--    math.huge: no limit (a call waits until its reply, a no_route, a full
--    queue or a lost connection); NaN or a negative number: every call fails
--    with invalid_argument
--  * serialiser ("json" or "msgpack"): must match the server's
--  * config (string): a config file
--  * tls (table): ca_cert, cert, key, verify_peer, verify_hostname
--  * connection_name (string): the name the broker shows for the connection
--  * any app setting of the config file (heartbeat, connect_timeout,
--    call_timeout, compress_threshold, max_body...), over the file's
-- @treturn Client a client, not yet connected
-- @raise a Lua error when opts is not a table, names an unknown option or
-- one of the wrong type, or the serialiser is unknown;
-- an error value of kind invalid_argument when the config cannot be used
-- @usage local client = rabi.client{ url = "amqp://guest:guest@localhost:5672/" }:connect()
function M.client(opts)
  if opts ~= nil and type(opts) ~= "table" then error("client: options must be a table", 2) end
  opts = opts or {}
  check_client_options(opts)
  local settings = config.resolve(opts)
  local codec, err = serial.get(opts.serialiser or settings.serialiser)
  if not codec then error("client: " .. err, 2) end
  local timeout = opts.timeout
  if timeout == nil then timeout = settings.call_timeout end
  local self = setmetatable({ settings = settings, timeout = timeout, codec = codec }, Client)
  self.fn = fn_proxy(self)
  return self
end

M.Client = Client

return M

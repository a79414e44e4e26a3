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
-- @tparam function fn the handler; it may be given in place of opts
-- @treturn table the registration (its queue, name, ftype...)
-- @raise a Lua error naming the bad option, when an option is invalid
-- @usage rabi.register_call("add", { params = { "a:number", "b:number" }, validate = true },
--   function(a, b) return a + b end)

M.register_call = service.register_call

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
  return core.spawn(fn, ...)
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

-- ---- logging ----

local function logger(level)
  return function(fmt, ...)
    if not core.log_enabled(level) then return end
    local msg = select("#", ...) > 0 and string.format(fmt, ...) or tostring(fmt)
    core.log(level, msg)
  end
end
--- The host's logger: one line on stderr with the time, the level and the
-- worker. Each of debug, info, warn and error takes a format and its
-- arguments, as string.format does (a lone argument is printed with
-- tostring). Lines below the log level (--log-level, app.log_level) cost
-- nothing.
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

local function check_ftype(ftype)
  if ftype == nil then return "async" end
  if ftype ~= "async" and ftype ~= "sync" then return nil end
  return ftype
end

-- The wait a call is given, as the C client takes it (0: no limit), from
-- the call's timeout or else the client's. nil and why for a value that
-- means nothing: NaN, a negative number, not a number.
local function call_timeout(t, client_default)
  if t == nil then t = client_default end
  if type(t) ~= "number" or t ~= t or t < 0 then
    return nil, ("timeout must be a non-negative number of seconds (0 or math.huge: no limit), got %s")
      :format(tostring(t))
  end
  if t == math.huge then return 0 end
  return t
end

-- Every call path ends here. -> true, err_code, result | false, 1, error
function Client:_call(name, args, kwargs, ftype, opts)
  if type(name) ~= "string" or name == "" then
    return false, 1, errors.new("invalid_argument", "function name must be a non-empty string")
  end
  if args ~= nil and type(args) ~= "table" then
    return false, 1, errors.new("invalid_argument", "args must be an array (table) or nil, got " .. type(args))
  end
  if kwargs ~= nil and type(kwargs) ~= "table" then
    return false, 1, errors.new("invalid_argument", "kwargs must be a table or nil, got " .. type(kwargs))
  end
  local ft = check_ftype(ftype)
  if not ft then
    return false, 1, errors.new("invalid_argument", "ftype must be 'async' or 'sync', got " .. tostring(ftype))
  end
  if opts ~= nil and type(opts) ~= "table" then
    return false, 1, errors.new("invalid_argument", "opts must be a table or nil")
  end
  local timeout, terr = call_timeout(opts and opts.timeout, self.timeout)
  if not timeout then return false, 1, errors.new("invalid_argument", terr) end
  local codec = self.codec
  local body, err = codec.encode_request(args, kwargs)
  if not body then return false, 1, errors.new("invalid_argument", err) end
  if not self._core then
    return false, 1, errors.new("connection", "the client is not connected (call :connect() first)")
  end
  local reply, cerr = self._core:call(ft .. "_" .. name, body, timeout)
  if not reply then
    cerr.func = name
    return false, 1, cerr
  end
  local code, result = codec.decode_reply(reply)
  if code == nil then return false, 1, errors.new("protocol", result, { func = name }) end
  if code then return true, 0, result end
  return true, 1, result
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
--  * invalid_argument: a bad argument to remote_call itself (name, args,
--    kwargs, ftype, opts), or a value that cannot be sent
--  * protocol: a reply that is not RabiBridge's format (for example from a
--    peer with another serialiser)
-- @tparam string name the function's name
-- @tparam[opt] table args the positional arguments, an array
-- @tparam[opt] table kwargs keyword arguments, a table with string keys
-- @tparam[opt="async"] string ftype "async" or "sync"
-- @tparam[opt] table opts per-call options: timeout (seconds; 0 or
-- math.huge: no limit; the client's when not given)
-- @return the function's result (nil for null)
-- @raise an error value (rabibridge.errors)
-- @usage local sum = client:remote_call("add", { 2, 3 })
function Client:remote_call(name, args, kwargs, ftype, opts)
  local success, err_code, result = self:_call(name, args, kwargs, ftype, opts)
  if not success then error(result, 2) end
  if err_code ~= 0 then
    local text = tostring(result)
    errors.raise("remote", serial.remote_message(text), { traceback = text, func = name })
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
-- (timeout, queue_full, no_route, connection, invalid_argument, protocol)
-- @treturn number err_code: 0 when result is the function's return value,
-- 1 otherwise
-- @return result: the function's result, the remote error's text (err_code
-- 1, success true), or an error value (success false)
function Client:try_remote_call(name, args, kwargs, ftype, opts)
  return self:_call(name, args, kwargs, ftype, opts)
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
    tls = s.tls,
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

-- client.fn.add(2, 3) is client:remote_call("add", {2, 3}).
local function fn_proxy(client)
  return setmetatable({}, {
    __index = function(_, name)
      return function(...) return client:remote_call(name, pack_args(...)) end
    end,
  })
end

--- Making a client.
-- @section client

--- Makes a client; call :connect() on it before calling. Settings come from
-- opts, then the flags rabihost was given, the environment (RABIBRIDGE_URL,
-- RABBITMQ_HOST...), the config file, then amqp://guest:guest@localhost:5672/.
-- @tparam[opt] table opts the options:
--
--  * url (string): the broker, amqp://user:password@host:port/vhost or
--    amqps://; several separated by spaces are tried in turn
--  * timeout (number): the default timeout of calls, in seconds; when not
--    given, the setting app.call_timeout (30 s unless configured). 0 or
--    math.huge: no limit (a call waits until its reply, a no_route, a full
--    queue or a lost connection); NaN or a negative number: every call fails
--    with invalid_argument
--  * serialiser ("json" or "msgpack"): must match the server's
--  * config (string): a config file
--  * tls (table): ca_cert, cert, key, verify_peer, verify_hostname
-- @treturn Client a client, not yet connected
-- @raise a Lua error when opts is not a table or the serialiser is unknown;
-- an error value of kind invalid_argument when the config cannot be used
-- @usage local client = rabi.client{ url = "amqp://guest:guest@localhost:5672/" }:connect()
function M.client(opts)
  if opts ~= nil and type(opts) ~= "table" then error("client: options must be a table", 2) end
  opts = opts or {}
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

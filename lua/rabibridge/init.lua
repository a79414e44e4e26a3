-- rabibridge: RPC over RabbitMQ for Lua, wire-compatible with the Python
-- RabiBridge. Services call register_call; clients call remote_call. Calls
-- that wait yield inside a coroutine of the host and block outside one.
local core = require "rabibridge.core"
local serial = require "rabibridge.serial"
local errors = require "rabibridge.errors"
local service = require "rabibridge.service"
local config = require "rabibridge.config"

local M = {}

M.version = core.version
M.null = serial.null
M.empty_array = setmetatable({}, serial.array_mt)
M.store = {}
M.errors = errors
M.is_error = errors.is_error

function M.array(t)
  return setmetatable(t or {}, serial.array_mt)
end

-- ---- services ----

M.register_call = service.register_call

local start_hooks = {}
M._start_hooks = start_hooks
function M.on_start(fn)
  if type(fn) ~= "function" then error("on_start: expected a function", 2) end
  start_hooks[#start_hooks + 1] = fn
end

-- ---- the loop ----

M.sleep = core.sleep
M.now = core.now

function M.spawn(fn, ...)
  if type(fn) ~= "function" then error("spawn: expected a function", 2) end
  return core.spawn(fn, ...)
end

M.wait = core.wait

-- ---- logging ----

local function logger(level)
  return function(fmt, ...)
    if not core.log_enabled(level) then return end
    local msg = select("#", ...) > 0 and string.format(fmt, ...) or tostring(fmt)
    core.log(level, msg)
  end
end
M.log = { debug = logger "DEBUG", info = logger "INFO", warn = logger "WARN", error = logger "ERROR" }

-- ---- the client ----

local Client = {}
Client.__index = Client

local function check_ftype(ftype)
  if ftype == nil then return "async" end
  if ftype ~= "async" and ftype ~= "sync" then return nil end
  return ftype
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
  local timeout = opts and opts.timeout or self.timeout
  if timeout ~= nil and (type(timeout) ~= "number" or timeout < 0) then
    return false, 1, errors.new("invalid_argument", "timeout must be a non-negative number of seconds")
  end
  local codec = self.codec
  local body, err = codec.encode_request(args, kwargs)
  if not body then return false, 1, errors.new("invalid_argument", err) end
  if not self._core then
    return false, 1, errors.new("connection", "the client is not connected (call :connect() first)")
  end
  local ok, reply, message = self._core:call(ft .. "_" .. name, body, timeout)
  if not ok then return false, 1, errors.new(reply, message, { func = name }) end
  local code, result = codec.decode_reply(reply)
  if code == nil then return false, 1, errors.new("protocol", result, { func = name }) end
  if code then return true, 0, result end
  return true, 1, result
end

function Client:remote_call(name, args, kwargs, ftype, opts)
  local success, err_code, result = self:_call(name, args, kwargs, ftype, opts)
  if not success then error(result, 2) end
  if err_code ~= 0 then
    local text = tostring(result)
    errors.raise("remote", serial.remote_message(text), { traceback = text, func = name })
  end
  return result
end

function Client:try_remote_call(name, args, kwargs, ftype, opts)
  return self:_call(name, args, kwargs, ftype, opts)
end

function Client:connect()
  if self._core and self._core:is_open() then return self end
  local s = self.settings
  local c, err = core.client_open(s.url, {
    heartbeat = s.heartbeat, connect_timeout = s.connect_timeout, cid_max = s.cid_max,
    compress_threshold = s.compress_threshold, max_body = s.max_body, name = s.connection_name,
    tls = s.tls,
  })
  if not c then errors.raise("connection", err) end
  self._core = c
  return self
end

function Client:close()
  if self._core then self._core:close() end
  self._core = nil
end

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

-- client.fn.add(2, 3) is client:remote_call("add", {2, 3}).
local function fn_proxy(client)
  return setmetatable({}, {
    __index = function(_, name)
      return function(...) return client:remote_call(name, pack_args(...)) end
    end,
  })
end

function M.client(opts)
  if opts ~= nil and type(opts) ~= "table" then error("client: options must be a table", 2) end
  opts = opts or {}
  local settings = config.resolve(opts)
  local codec, err = serial.get(opts.serialiser or settings.serialiser)
  if not codec then error("client: " .. err, 2) end
  local self = setmetatable({ settings = settings, timeout = opts.timeout, codec = codec }, Client)
  self.fn = fn_proxy(self)
  return self
end

M.Client = Client

return M

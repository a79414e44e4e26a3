--- The HTTP gateway (rabihost gateway, or http.listen beside serve): POST
-- /rpc/NAME calls the remote function NAME, GET /rpc lists the functions
-- served, and a service script's own routes (rabi.http.route) answer the
-- rest. Each request is a task of the worker's loop (host/gateway.c), so a
-- route's handler may call remote functions, in parallel with rabi.spawn
-- and rabi.wait, without holding the worker.
--
-- Every error is answered with a JSON body {"kind": ..., "message": ...}.
-- @module rabibridge.gateway
local core = require "rabibridge.core"
local errors = require "rabibridge.errors"
local serial = require "rabibridge.serial"

local M = {}

-- "METHOD /path" -> handler; "/path" -> its methods, in a table of their
-- own (a request's path may be anything, "GET /text" too); and the paths
-- in the order they were added.
local routes, methods_of, route_paths = {}, {}, {}
M._routes = routes

local METHODS = { GET = true, HEAD = true, POST = true, PUT = true, DELETE = true, PATCH = true, OPTIONS = true }

--- Adds a route to the gateway of the worker that loads the script (rabi.http.route).
-- The handler runs as a task for each request: it may call remote
-- functions (they yield) and spawn tasks. It gets the request, a table:
--
--  * method, path (without the query string)
--  * query: the query parameters, name -> value (strings)
--  * headers: name (in lower case) -> value
--  * body: the body, a string ("" when none)
--  * json(): the body decoded as JSON; raises an error value of kind
--    invalid_argument (answered 400) when it is not JSON
--
-- and returns one of: a table (200, the table as JSON); a string (200,
-- text/plain); nil (204); or status, body (a string, or a table sent as
-- JSON) and a table of headers. An error value it raises is answered as the
-- gateway answers a failed call (timeout 504, no_route 404...); any other
-- error is 500, logged, its text not sent.
-- @tparam string spec "METHOD /path", an exact path: "GET /add"
-- @tparam function handler function(req) -> see above
-- @raise a Lua error naming the mistake when spec is not "METHOD /path",
-- the method unknown, the path under /rpc, or the route already added
-- @usage rabi.http.route("GET /add", function(req)
--   return { sum = client:remote_call("add", { tonumber(req.query.a), tonumber(req.query.b) }) }
-- end)
function M.route(spec, handler)
  if type(spec) ~= "string" then error("http.route: spec must be a string \"METHOD /path\"", 2) end
  local method, path = spec:match("^(%u+)%s+(/%S*)$")
  if not method then error(("http.route: spec must be \"METHOD /path\", got %q"):format(spec), 2) end
  if not METHODS[method] then error(("http.route: unknown method %s in %q"):format(method, spec), 2) end
  if path == "/rpc" or path:find("^/rpc/") then error(("http.route: %s is the gateway's own"):format(path), 2) end
  if type(handler) ~= "function" then error("http.route: handler must be a function", 2) end
  if routes[method .. " " .. path] then error(("http.route: %s is already routed"):format(spec), 2) end
  if not methods_of[path] then
    route_paths[#route_paths + 1] = path
    methods_of[path] = {}
  end
  routes[method .. " " .. path] = handler
  methods_of[path][#methods_of[path] + 1] = method
end

-- ---- answers ----

local JSON = { ["Content-Type"] = "application/json" }

local function encode(v)
  local ok, s = pcall(serial.encode, v == nil and serial.null or v)
  if ok then return s end
  return nil, s
end

-- s with the bytes JSON cannot carry as they are (not UTF-8: every byte
-- >= 0x80) written \xHH.
local function ascii(s)
  return (tostring(s):gsub("[\128-\255]", function(c) return ("\\x%02X"):format(c:byte()) end))
end

-- status, body, headers of a {"kind", "message"} answer. A message that is
-- not UTF-8 (a path or header quoted in it) is sent with its bytes >= 0x80
-- escaped.
local function fail(status, kind, message, headers)
  local h = { ["Content-Type"] = "application/json" }
  for k, v in pairs(headers or {}) do h[k] = v end
  local body = encode { kind = kind, message = message } or encode { kind = kind, message = ascii(message) }
  return status, body .. "\n", h
end
M.fail = fail

-- A remote error that is the host refusing the arguments (its params) or a
-- Python server's TypeError or pydantic ValidationError about them.
local function refused_arguments(name, message)
  local n = name:gsub("%p", "%%%0")
  return message:find("^" .. n .. " takes ") or message:find("^" .. n .. " got ")
    or message:find("^" .. n .. " missing required argument") or message:find("^" .. n .. ": argument '")
    or message:find("^TypeError: .*argument") or message:find("ValidationError") ~= nil
end

local STATUS = {
  no_route = 404, queue_full = 503, timeout = 504, cancelled = 504, connection = 503, not_accepted = 503,
  invalid_argument = 400, protocol = 502, remote = 502,
}

--- The HTTP status an error value is answered with: no_route 404,
-- queue_full 503, timeout and cancelled 504, connection 503,
-- invalid_argument 400, remote and protocol 502, anything else 500.
-- @tparam table err an error value (rabibridge.errors)
-- @treturn number the status
function M.status_of(err)
  return STATUS[err.kind] or 500
end

local function fail_error(err)
  local status = M.status_of(err)
  return fail(status, err.kind, err.message, err.kind == "queue_full" and { ["Retry-After"] = "1" } or nil)
end

-- ---- the request's deadline ----

-- X-Request-Timeout: seconds, a decimal number > 0, clipped to max_timeout;
-- without it, the default. -> seconds | nil, message
local function request_timeout(req, http)
  local v = req.headers["x-request-timeout"]
  if v == nil then return http.timeout end
  local t = tonumber(v)
  if not t or t ~= t or t <= 0 or not v:match("^%s*[%d.]+%s*$") then
    return nil, ("X-Request-Timeout must be a number of seconds > 0, got %q"):format(v)
  end
  return math.min(t, http.max_timeout)
end

-- ---- /rpc ----

local function decode_call(body)
  if body == "" then return {}, {} end
  local ok, v = pcall(serial.decode, body)
  if not ok or type(v) ~= "table" then return nil, "the body must be a JSON array of arguments or an object"
    .. " {\"args\": [...], \"kwargs\": {...}}" end
  if serial.is_array(v) or next(v) == nil then return v, {} end
  for k in pairs(v) do
    if k ~= "args" and k ~= "kwargs" then return nil, ("unknown field %q in the body: expected args, kwargs"):format(k) end
  end
  local args, kwargs = v.args or {}, v.kwargs or {}
  if type(args) ~= "table" or (next(args) ~= nil and not serial.is_array(args)) then
    return nil, "args must be a JSON array"
  end
  if type(kwargs) ~= "table" or (next(kwargs) ~= nil and serial.is_array(kwargs)) then
    return nil, "kwargs must be a JSON object"
  end
  return args, kwargs
end

local HEX = "[0-9a-f]"
local TRACEPARENT = "^00%-" .. HEX:rep(32) .. "%-" .. HEX:rep(16) .. "%-" .. HEX:rep(2) .. "$"

local function call(gw, req, name)
  local timeout, terr = request_timeout(req, gw.http)
  if not timeout then return fail(400, "invalid_argument", terr) end
  local args, kwargs = decode_call(req.body)
  if not args then return fail(400, "invalid_argument", kwargs) end
  local client, cerr = gw:client()
  if not client then return fail(503, "connection", cerr) end
  -- A W3C traceparent header continues the caller's trace; a malformed one is ignored, as W3C says.
  local parent = req.headers.traceparent
  if parent and not parent:match(TRACEPARENT) then parent = nil end
  local success, code, result = client:try_remote_call(name, args, kwargs, nil,
    { timeout = timeout, traceparent = parent })
  if not success then return fail_error(result) end
  if code ~= 0 then
    local message = serial.remote_message(tostring(result))
    if refused_arguments(name, message) then return fail(400, "invalid_argument", message) end
    return fail(502, "remote", message)
  end
  local body, err = encode(result)
  if not body then return fail(502, "protocol", "the result cannot be sent as JSON: " .. tostring(err)) end
  return 200, body .. "\n", JSON
end

local function list(gw)
  local client, cerr = gw:client()
  if not client then return fail(503, "connection", cerr) end
  local found, summary = require("rabibridge.discovery").discover(client, { wait = gw.http.list_wait })
  if not found then return fail_error(summary) end
  local functions = setmetatable({}, serial.array_mt)
  for _, f in ipairs(found) do
    functions[#functions + 1] = { name = f.name, ftype = f.ftype, params = f.params or serial.null,
                                  consumers = f.consumers }
  end
  local own = setmetatable({}, serial.array_mt)
  for _, path in ipairs(route_paths) do
    for _, method in ipairs(methods_of[path]) do own[#own + 1] = method .. " " .. path end
  end
  return 200, encode { functions = functions, routes = own } .. "\n", JSON
end

-- ---- Lua routes ----

local function with_json(req)
  function req.json()
    local ok, v = pcall(serial.decode, req.body)
    if not ok then errors.raise("invalid_argument", "the body is not JSON: " .. tostring(v)) end
    return v
  end
  return req
end

-- s for a log line: control characters, backslash and bytes >= 0x80 (a
-- client's path may hold any) written \xHH.
local function printable(s)
  return (tostring(s):gsub("[%c\\\128-\255]", function(c) return ("\\x%02X"):format(c:byte()) end))
end

-- A route's results as status, body, headers.
local function shape(req, status, body, headers)
  if status == nil then return 204, "", {} end
  if type(status) == "table" then
    local s, err = encode(status)
    if not s then return fail(500, "internal", "the route's answer cannot be sent as JSON: " .. tostring(err)) end
    return 200, s .. "\n", JSON
  end
  if type(status) == "string" then return 200, status, { ["Content-Type"] = "text/plain; charset=utf-8" } end
  if type(status) ~= "number" or status < 100 or status > 599 or status % 1 ~= 0 then
    return fail(500, "internal", "the route returned no status")
  end
  if status < 200 then -- 1xx is no answer: the client would wait for one
    core.log("ERROR", ("http: %s %s: the route returned %d, an interim status, not an answer")
      :format(req.method, printable(req.path), status))
    return fail(500, "internal", "the route returned an interim (1xx) status (see the gateway's log)")
  end
  local h = {}
  for k, v in pairs(headers or {}) do h[tostring(k)] = tostring(v) end
  if type(body) == "table" then
    local s, err = encode(body)
    if not s then return fail(500, "internal", "the route's answer cannot be sent as JSON: " .. tostring(err)) end
    body = s .. "\n"
    if not h["Content-Type"] and not h["content-type"] then h["Content-Type"] = "application/json" end
  elseif body == nil then
    body = ""
  else
    body = tostring(body)
    if not h["Content-Type"] and not h["content-type"] then h["Content-Type"] = "text/plain; charset=utf-8" end
  end
  return status, body, h
end

local function run_route(handler, req)
  local results = { xpcall(handler, function(e)
    if errors.is_error(e) then return e end
    return debug.traceback(tostring(e), 2)
  end, with_json(req)) }
  if results[1] then return shape(req, unpack(results, 2, 4)) end
  local e = results[2]
  if errors.is_error(e) then return fail_error(e) end
  core.log("ERROR", ("http: %s %s raised: %s"):format(req.method, printable(req.path), tostring(e)))
  return fail(500, "internal", "the route's handler failed (see the gateway's log)")
end

-- ---- the handler ----

-- The bearer token (http.token) is checked by the server with the headers,
-- before any body is read (host/http.c): a request gets here with it.
local function dispatch(gw, req)
  local path = req.path
  -- HEAD is GET without the body (libmicrohttpd leaves it out).
  local handler = routes[req.method .. " " .. path] or (req.method == "HEAD" and routes["GET " .. path])
  if handler then return run_route(handler, req) end
  if methods_of[path] then
    local allow = table.concat(methods_of[path], ", ")
    return fail(405, "method_not_allowed", ("%s %s: allowed are %s"):format(req.method, path, allow), { Allow = allow })
  end
  if path == "/rpc" or path == "/rpc/" then
    if req.method ~= "GET" and req.method ~= "HEAD" then
      return fail(405, "method_not_allowed", "GET /rpc lists the functions; call one with POST /rpc/NAME",
        { Allow = "GET, HEAD" })
    end
    return list(gw)
  end
  local name = path:match("^/rpc/([^/]+)$")
  if name then
    if req.method ~= "POST" then
      return fail(405, "method_not_allowed", ("call %s with POST /rpc/%s"):format(name, name), { Allow = "POST" })
    end
    return call(gw, req, name)
  end
  return fail(404, "not_found", ("no route for %s %s: POST /rpc/NAME calls a function, GET /rpc lists them")
    :format(req.method, path))
end

-- ---- the gateway of a worker ----

local Gateway = {}
Gateway.__index = Gateway

-- The client, connected; a gateway started while the broker was away
-- connects at a request (at most once a second). -> client | nil, message
function Gateway:client()
  local c = self._client
  if c:is_connected() then return c end
  if c._core then return nil, "the connection to the broker is lost; reconnecting" end
  local now = core.now()
  if self._next_connect and now < self._next_connect then
    return nil, "the broker cannot be reached: " .. (self._connect_error or "")
  end
  local ok, err = pcall(c.connect, c)
  if ok then return c end
  self._next_connect, self._connect_error = now + 1, tostring(err.message or err)
  return nil, "the broker cannot be reached: " .. self._connect_error
end

-- The PEM text of a file. -> text | nil, message
local function read_pem(path, what)
  local f, err = io.open(path, "rb")
  if not f then return nil, ("http.%s: %s"):format(what, err) end
  local text = f:read("*a")
  f:close()
  return text
end

--- Starts the gateway of a worker (rabihost serve with http.listen, or
-- rabihost gateway).
-- @tparam table http the http settings (config.http_settings): listen,
-- max_body, max_inflight, max_connections, header_limit, client_timeout,
-- timeout, max_timeout, token, tls_cert, tls_key, list_wait
-- @tparam[opt] number fd a listening socket the supervisor opened (shared by
-- the workers); without it, http.listen is bound here
-- @treturn table|nil the gateway: server (core's, for worker_serve), close()
-- @treturn ?error an error value of kind io (the socket, the TLS files)
function M.start(http, fd)
  local rabi = require "rabibridge"
  local opts = {
    fd = fd, listen = not fd and http.listen or nil, max_body = http.max_body,
    max_inflight = http.max_inflight, max_connections = http.max_connections,
    header_limit = http.header_limit, client_timeout = http.client_timeout,
    deadline = http.max_timeout + 5, token = http.token or nil,
  }
  if http.tls_cert or http.tls_key then
    if not (http.tls_cert and http.tls_key) then
      return nil, errors.new("invalid_argument", "http.tls_cert and http.tls_key go together")
    end
    local err
    opts.tls_cert, err = read_pem(http.tls_cert, "tls_cert")
    if not opts.tls_cert then return nil, errors.new("io", err) end
    opts.tls_key, err = read_pem(http.tls_key, "tls_key")
    if not opts.tls_key then return nil, errors.new("io", err) end
  end
  local gw = setmetatable({ http = http, _client = rabi.client { timeout = http.timeout } }, Gateway)
  pcall(gw._client.connect, gw._client) -- else at the first request
  local server, err = core.http_serve(opts, function(req) return dispatch(gw, req) end)
  if not server then
    gw._client:close()
    return nil, err
  end
  gw.server = server
  return gw
end

function Gateway:close()
  self.server:close()
  self._client:close()
end

return M

-- rabihost repl: read a line, evaluate it in a task, print its values.
--
-- What makes it forgiving: Ctrl-C cancels the line being typed or the call
-- in progress and the session goes on (host/interrupt.c); the history is
-- kept in a file; Tab completes names, fields, methods and the functions
-- served on the broker; values print as data (strings quoted, tables as
-- JSON); and a `local` that starts an entry stays defined for the session.
local core = require "rabibridge.core"
local rabi = require "rabibridge"
local config = require "rabibridge.config"
local serial = require "rabibridge.serial"

local M = {}

local null, array_mt = serial.null, serial.array_mt

-- ---- printing values ----

-- Tables in the fallback form (not JSON-able) print this deep and this wide.
local MAX_DEPTH, MAX_ITEMS = 5, 100

local function is_finite(n) return n == n and n ~= math.huge and n ~= -math.huge end

-- A number as JSON has it (every digit of an integer), else as Lua does.
local function number_text(n)
  if not is_finite(n) then return tostring(n) end
  return core.json_encode(n) or tostring(n)
end

-- A string in double quotes: as JSON when it is UTF-8, else with Lua's
-- decimal escapes for the bytes JSON cannot hold.
local function quote(s)
  local json = core.json_encode(s)
  if json then return json end
  return '"' .. s:gsub('[%c"\\\128-\255]', function(c)
    local named = { ["\n"] = "\\n", ["\t"] = "\\t", ["\r"] = "\\r", ['"'] = '\\"', ["\\"] = "\\\\" }
    return named[c] or ("\\%d"):format(c:byte())
  end) .. '"'
end

-- The array length of t as the codecs see it (host/values.c's rule), or nil
-- when t is a map.
local function array_length(t)
  if getmetatable(t) == array_mt then return #t end
  local count, max = 0, 0
  for k in pairs(t) do
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then return nil end
    if k > max then max = k end
    count = count + 1
  end
  if count == 0 or max > 2 * count then return nil end
  return max
end

-- Keys in a stable order: numbers, then strings, each sorted.
local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta < tb end
    if ta == "number" or ta == "string" then return a < b end
    return tostring(a) < tostring(b)
  end)
  return keys
end

-- v as JSON with sorted keys, or nil when it is not JSON-able (a function,
-- a cycle, a key that is neither string nor number, an object with a
-- metatable of its own).
local function to_json(v, seen)
  local t = type(v)
  if v == null then return "null" end
  if t == "boolean" then return tostring(v) end
  if t == "number" then return is_finite(v) and number_text(v) or nil end
  if t == "string" or t == "cdata" then return (core.json_encode(v)) end
  if t ~= "table" or seen[v] then return nil end
  local mt = getmetatable(v)
  if mt ~= nil and mt ~= array_mt then return nil end
  seen[v] = true
  local parts = {}
  local n = array_length(v)
  if n then
    for i = 1, n do
      local item = v[i] == nil and "null" or to_json(v[i], seen)
      if not item then return nil end
      parts[i] = item
    end
  else
    for _, k in ipairs(sorted_keys(v)) do
      local key = type(k) == "string" and core.json_encode(k)
        or type(k) == "number" and is_finite(k) and core.json_encode(number_text(k))
      local item = key and to_json(v[k], seen)
      if not item then return nil end
      parts[#parts + 1] = key .. ":" .. item
    end
  end
  seen[v] = nil
  return n and "[" .. table.concat(parts, ",") .. "]" or "{" .. table.concat(parts, ",") .. "}"
end

local function is_identifier(s)
  return type(s) == "string" and s:match("^[%a_][%w_]*$") ~= nil
end

-- v as a Lua table constructor, for what JSON cannot say: functions and
-- the like as <...>, a table met again as <cycle>.
local function to_lua(v, depth, seen)
  local t = type(v)
  if t == "string" then return quote(v) end
  if t == "number" then return number_text(v) end
  if v == null then return "null" end
  if t ~= "table" then return "<" .. tostring(v) .. ">" end
  local mt = getmetatable(v)
  if type(mt) == "table" and rawget(mt, "__tostring") then return "<" .. tostring(v) .. ">" end
  if seen[v] then return "<cycle>" end
  if depth > MAX_DEPTH then return "{...}" end
  seen[v] = true
  local parts, n = {}, #v
  for i = 1, math.min(n, MAX_ITEMS) do parts[i] = to_lua(v[i], depth + 1, seen) end
  local shown = #parts
  for _, k in ipairs(sorted_keys(v)) do
    if not (type(k) == "number" and k >= 1 and k <= n and k % 1 == 0) then
      if shown >= MAX_ITEMS then
        parts[#parts + 1] = "..."
        break
      end
      local key = is_identifier(k) and k or "[" .. to_lua(k, depth + 1, seen) .. "]"
      parts[#parts + 1] = key .. " = " .. to_lua(v[k], depth + 1, seen)
      shown = shown + 1
    end
  end
  seen[v] = nil
  return "{" .. table.concat(parts, ", ") .. "}"
end

-- name(a:number, b?) from a served function's description.
local function signature(fn)
  if type(fn.params) ~= "table" then return fn.name .. "(...)" end
  local parts = {}
  for i, p in ipairs(fn.params) do
    if type(p) == "table" then
      p = tostring(p.name) .. (p.type and p.type ~= "any" and ":" .. p.type or "") .. (p.optional and "?" or "")
    end
    parts[i] = tostring(p)
  end
  return fn.name .. "(" .. table.concat(parts, ", ") .. ")"
end

local function error_text(e)
  return ("%s: %s"):format(tostring(e.kind), tostring(e.message))
end

-- One value as the REPL prints it. served(client) -> the functions served
-- (see Session:served), for client.fn and client.fn.NAME.
local function show_value(v, served)
  local t = type(v)
  if t == "string" then return quote(v) end
  if t == "number" then return number_text(v) end
  if v == null then return "null" end
  if rabi.is_error(v) then return "<error " .. error_text(v) .. ">" end
  local remote = (t == "table" or t == "function") and rabi.remote_function(v)
  if remote and remote.client then
    local list = served and served(remote.client)
    if remote.name then
      for _, fn in ipairs(list or {}) do
        if fn.name == remote.name and fn.ftype ~= "sync" then return "<remote function " .. signature(fn) .. ">" end
      end
      return "<remote function " .. remote.name .. (list and ": not served>" or ">")
    end
    if not list then return "<remote functions of " .. tostring(remote.client) .. ">" end
    local names = {}
    for _, fn in ipairs(list) do
      if fn.ftype ~= "sync" then names[#names + 1] = signature(fn) end
    end
    table.sort(names)
    return "<remote functions: " .. table.concat(names, ", ") .. ">"
  end
  if t == "table" then
    local mt = getmetatable(v)
    if type(mt) == "table" and rawget(mt, "__tostring") then return tostring(v) end
    return to_json(v, {}) or to_lua(v, 1, {})
  end
  if t == "cdata" then return core.json_encode(v) or tostring(v) end
  return tostring(v)
end
M.show_value = show_value

-- ---- completion ----

local KEYWORDS = {
  "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if", "in",
  "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while",
}

-- obj[key] without running an __index function (completion must not call
-- code): raw fields, then the __index tables of metatables, as methods
-- are found; a string's are the string library's.
local function peek(obj, key)
  if type(obj) == "string" then return string[key] end
  for _ = 1, 10 do
    if type(obj) == "table" then
      local v = rawget(obj, key)
      if v ~= nil then return v end
    elseif type(obj) ~= "userdata" then
      return nil
    end
    local mt = getmetatable(obj)
    local index = type(mt) == "table" and rawget(mt, "__index")
    if type(index) ~= "table" then return nil end
    obj = index
  end
end

-- The names peek can find in obj (methods only: the function-valued ones).
local function field_names(obj, methods)
  local names, seen = {}, {}
  if type(obj) == "string" then obj = string end
  for _ = 1, 10 do
    if type(obj) == "table" then
      for k, v in pairs(obj) do
        if is_identifier(k) and not seen[k] and (not methods or type(v) == "function") then
          seen[k] = true
          names[#names + 1] = k
        end
      end
    elseif type(obj) ~= "userdata" then
      break
    end
    local mt = getmetatable(obj)
    local index = type(mt) == "table" and rawget(mt, "__index")
    if type(index) ~= "table" then break end
    obj = index
  end
  return names
end

-- The words that may replace word (an expression path: a.b.c or a.b:c).
-- env: the session's variables; served(client) -> the served functions.
local function complete(word, env, served)
  local path, sep, last = word:match("^([%a_][%w_%.]*)([%.:])([%w_]*)$")
  local names, prefix = {}, ""
  if not path then
    if not word:match("^[%a_][%w_]*$") and word ~= "" then return {} end
    last = word
    for _, k in ipairs(KEYWORDS) do names[#names + 1] = k end
    for _, scope in ipairs { env, _G } do
      for k in pairs(scope) do
        if is_identifier(k) then names[#names + 1] = k end
      end
    end
  else
    local obj
    for name in (path .. "."):gmatch("([^.]*)%.") do
      if not is_identifier(name) then return {} end
      if obj == nil then
        obj = rawget(env, name)
        if obj == nil then obj = rawget(_G, name) end
      else
        obj = peek(obj, name)
      end
      if obj == nil then return {} end
    end
    prefix = path .. sep
    local remote = rabi.remote_function(obj)
    if remote and remote.client and not remote.name then
      if sep == ":" then return {} end
      for _, fn in ipairs(served(remote.client) or {}) do
        if fn.ftype ~= "sync" then names[#names + 1] = fn.name end -- client.fn calls async ones
      end
    else
      names = field_names(obj, sep == ":")
    end
  end
  -- Private names (_x) only when asked for.
  local hide_private = last:sub(1, 1) ~= "_"
  local out, seen = {}, {}
  for _, n in ipairs(names) do
    if not seen[n] and n:sub(1, #last) == last and not (hide_private and n:sub(1, 1) == "_") then
      seen[n] = true
      out[#out + 1] = prefix .. n
    end
  end
  table.sort(out)
  return out
end
M.complete = complete

-- ---- the served functions ----

-- How long a list of served functions is reused: Tab is often pressed twice.
local SERVED_TTL = 5

-- The seam to discovery (issue 12, point 5): provider(client) -> a list of
-- { name =, params = { "a:number", ... } | nil, ftype = "async" | "sync" |
-- nil } | nil, message. params may also hold { name =, type =, optional = }
-- tables. The default asks rabi.discover, when this rabibridge has it.
local function default_provider(client)
  local discover = rabi.discover
  if type(discover) ~= "function" then return nil, "this rabibridge cannot list the functions served" end
  return discover(client)
end
M.default_provider = default_provider

-- ---- the session ----

local Session = {}
Session.__index = Session

-- opts: { client =, provider = } -> a session (its env holds rabi and client)
function M.new(opts)
  local self = setmetatable({ provider = opts.provider or default_provider, cache = setmetatable({}, { __mode = "k" }) },
    Session)
  self.env = setmetatable({ rabi = rabi, client = opts.client }, { __index = _G })
  self.served_fn = function(client) return self:served(client) end
  self.complete_fn = function(word) return complete(word, self.env, self.served_fn) end
  return self
end

-- The functions served on client's broker (cached for SERVED_TTL), or nil.
function Session:served(client)
  local c = self.cache[client]
  if not c or core.now() - c.at > SERVED_TTL then
    local ok, list = pcall(self.provider, client)
    c = { at = core.now(), list = ok and type(list) == "table" and list or nil }
    self.cache[client] = c
  end
  return c.list
end

-- A `local` that starts an entry assigns the session's variable instead:
-- the next line would not see a local of this one.
local function keep_locals(source)
  local fname = source:match("^%s*local%s+function%s+([%a_][%w_]*)")
  if fname then return (source:gsub("^%s*local%s+function", "function", 1)) end
  if source:match("^%s*local%s+[%a_][%w_]*%s*[,=]") and source:match("^%s*local%s+[%w_,%s]-=") then
    return (source:gsub("^%s*local%s+", "", 1))
  end
  return source
end
M.keep_locals = keep_locals

-- -> a function for the entry | false, message (a syntax error) | nil when
-- the entry goes on on the next line
function Session:compile(source)
  source = keep_locals(source)
  -- An expression's values, through select so that a call in it is no tail
  -- call: an error raised there keeps the line's position ("repl:1:").
  local chunk = loadstring("return select(1, " .. source .. "\n)", "=repl")
  local err
  if not chunk then chunk, err = loadstring(source, "=repl") end
  if not chunk then
    -- Incomplete, as a statement or as an expression ({1, goes on too).
    local _, experr = loadstring("return " .. source, "=repl")
    if err:match("'<eof>'$") or experr:match("'<eof>'$") then return nil end
    return false, err
  end
  -- Interpreted, so that Ctrl-C can stop a loop of the line: code the JIT
  -- compiled does not run the hook that stops it (host/interrupt.c).
  jit.off(chunk, true)
  return setfenv(chunk, self.env)
end

-- What an error raised by a line says: an error value by its kind, any
-- other with its traceback up to the line's own code.
local function on_error(e)
  if rabi.is_error(e) then return e end
  local text = debug.traceback(tostring(e), 2)
  return (text:gsub("\n%s*%[C%]: in function 'xpcall'.*$", ""))
end

-- host/interrupt.c's reason, in the errors Ctrl-C causes.
local INTERRUPTED = "interrupted by Ctrl-C"

local function report(e)
  -- The terminal echoed ^C where the cursor was.
  if tostring(rabi.is_error(e) and e.message or e):find(INTERRUPTED, 1, true) then io.stdout:write("\n") end
  if rabi.is_error(e) then
    local text = "error: " .. error_text(e)
    if e.traceback and e.traceback ~= "" and e.traceback ~= e.message then
      text = text .. "\n" .. e.traceback:gsub("\n$", "")
    end
    io.stdout:write(text, "\n")
  else
    io.stdout:write("error: ", tostring(e), "\n")
  end
end

local function pack(...) return { n = select("#", ...), ... } end

-- Runs a compiled entry in a task that Ctrl-C cancels, and prints what it
-- gives.
function Session:run(chunk)
  local task = rabi.spawn(function()
    -- A task runs at once until it first waits: this wait lets Ctrl-C learn
    -- of it before the entry's code runs (a loop that never waits included).
    local started, err = core.sleep(0)
    if not started then return pack(false, err) end
    return pack(xpcall(chunk, on_error))
  end)
  core.interrupt_task(task)
  local ok, res = rabi.wait(task)
  core.interrupt_task(nil)
  if not ok then return report(res) end
  if not res[1] then return report(res[2]) end
  if res.n < 2 then return end
  local parts = {}
  for i = 2, res.n do parts[#parts + 1] = show_value(res[i], self.served_fn) end
  io.stdout:write(table.concat(parts, "\t"), "\n")
end

-- Reads one entry (as many lines as it takes). -> a function to run |
-- false (nothing to run: a syntax error shown, or Ctrl-C) | nil at the end
-- of input
function Session:read()
  local source
  while true do
    local line, err = core.readline(source and ">> " or "> ", self.complete_fn)
    if err then return false end
    if line == nil then return nil end
    source = source and source .. "\n" .. line or line
    local chunk, cerr = self:compile(source)
    if chunk then return chunk end
    if chunk == false then
      io.stdout:write(cerr, "\n")
      return false
    end
  end
end

-- The history file: $RABIBRIDGE_HISTORY (empty or "off": none), else
-- $XDG_STATE_HOME/rabibridge/history, else ~/.local/state/rabibridge/history.
function M.history_path()
  local path = os.getenv("RABIBRIDGE_HISTORY")
  if path then
    if path == "" or path == "off" then return nil end
    return path
  end
  local state = os.getenv("XDG_STATE_HOME")
  if not state or state:sub(1, 1) ~= "/" then -- relative: ignored, as the XDG spec says
    local home = os.getenv("HOME")
    if not home or home == "" then return nil end
    state = home .. "/.local/state"
  end
  return state .. "/rabibridge/history"
end

local function open_history()
  local path = M.history_path()
  if not path then return end
  local size = os.getenv("RABIBRIDGE_HISTORY_SIZE")
  local n = tonumber(size or "1000")
  if not n or n < 1 or n % 1 ~= 0 then
    io.stdout:write("warning: RABIBRIDGE_HISTORY_SIZE must be a whole number >= 1, not ", size, "; using 1000\n")
    n = 1000
  end
  local ok, err = core.history_file(path, n)
  if not ok then io.stdout:write("warning: no history: ", err.message, "\n") end
end

-- The REPL, until the end of input. -> the exit code
function M.run(settings, opts)
  opts = opts or {}
  local client = rabi.client()
  local ok, cerr = pcall(client.connect, client)
  io.stdout:write(("rabibridge %s on %s -- `rabi` and `client` are ready; client.fn.NAME(...) calls NAME\n")
    :format(core.version, config.mask_url(settings.url)))
  io.stdout:write("Tab completes, Ctrl-C cancels the line or the call, Ctrl-D ends.\n")
  if not ok then io.stdout:write("warning: not connected: ", tostring(cerr), "\n") end
  if core.interactive() then open_history() end
  local session = M.new { client = client, provider = opts.provider }
  core.catch_interrupts(true)
  while true do
    local chunk = session:read()
    if chunk == nil then break end
    if chunk then session:run(chunk) end
  end
  core.catch_interrupts(false)
  io.stdout:write("\n")
  client:close()
  return 0
end

return M

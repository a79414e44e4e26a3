-- Discovery: the functions served on a broker, as the hosts serving them
-- describe themselves (rabihost list, rabi.discover, the REPL's Tab).
--
-- Every worker answers a request published to the rpc exchange with the
-- routing key rabihost.list (host/discovery.h says why the hosts answer,
-- not the broker). The asker gathers the answers for a short window,
-- merges them by queue (several workers and hosts serve one), and asks the
-- broker for each queue's consumers and waiting calls. Python RabiBridge
-- servers do not answer: their functions are found only by name.
local core = require "rabibridge.core"
local serial = require "rabibridge.serial"
local wire = require "rabibridge.wire"

local M = {}

-- What a request and its answers carry, so that a later rabihost can tell
-- an answer it reads differently.
M.protocol = "rabihost.discovery/1"
-- Seconds an asker gathers answers by default: a worker answers in
-- milliseconds when its loop is free; one busy past this is not listed.
M.default_wait = 0.5

local array_mt = serial.array_mt
local function array(t) return setmetatable(t, array_mt) end

-- ---- the answer a worker gives ----

-- register_call's own form of a parameter: "a:number", "b:string?", and a
-- bare name for any type.
local function param_text(p)
  return p.name .. (p.type ~= "any" and ":" .. p.type or "") .. (p.optional and "?" or "")
end

-- The x- arguments of the function's queue, as host/server.c declares them.
local function queue_arguments(spec)
  local args = { ["x-overflow"] = "reject-publish" }
  if spec.ttl_ms and spec.ttl_ms > 0 then args["x-message-ttl"] = spec.ttl_ms end
  if spec.queue_size and spec.queue_size > 0 then args["x-max-length"] = spec.queue_size end
  return args
end

local ffi = require "ffi"
pcall(ffi.cdef, "int getppid(void);")

-- specs: the registrations a worker serves (rabibridge.service). -> JSON
function M.answer(specs)
  local functions = {}
  for i, spec in ipairs(specs) do
    local params
    if spec.params then
      params = array {}
      for j, p in ipairs(spec.params) do params[j] = param_text(p) end
    end
    functions[i] = {
      name = spec.name, ftype = spec.ftype, queue = spec.queue, params = params,
      validate = spec.validate, queue_arguments = queue_arguments(spec),
      auto_delete = spec.auto_delete ~= false, fetch_size = spec.fetch_size, source = spec.position,
    }
  end
  local info = core.process_info()
  return assert(core.json_encode {
    protocol = M.protocol, version = core.version, host = core.hostname(), pid = info.pid,
    worker = info.worker, supervisor = ffi.C.getppid(), functions = array(functions),
  })
end

-- ---- asking ----

local function same(a, b)
  return (a == nil and b == nil) or (a ~= nil and b ~= nil and core.json_encode(a) == core.json_encode(b))
end

-- One answer's functions into by_queue. -> false when it is not an answer
local function merge(by_queue, body)
  local a = core.json_decode(body)
  if type(a) ~= "table" or type(a.protocol) ~= "string" or not a.protocol:match("^rabihost%.discovery/")
      or type(a.functions) ~= "table" then
    return false
  end
  local host = { host = a.host, pid = a.pid, worker = a.worker, supervisor = a.supervisor, version = a.version }
  for _, f in ipairs(a.functions) do
    if type(f) == "table" and type(f.name) == "string" and type(f.queue) == "string" then
      local e = by_queue[f.queue]
      if not e then
        e = {
          name = f.name, ftype = f.ftype, queue = f.queue, params = f.params, validate = f.validate == true,
          queue_arguments = f.queue_arguments, auto_delete = f.auto_delete, fetch_size = f.fetch_size,
          known = true, hosts = array {},
        }
        by_queue[f.queue] = e
      elseif not same(e.params, f.params) or not same(e.queue_arguments, f.queue_arguments) then
        e.differs = true -- a rolling upgrade, or two services under one name
      end
      e.hosts[#e.hosts + 1] = host
    end
  end
  return true
end

local function wanted_set(names)
  if not names then return nil end
  local set = {}
  for _, n in ipairs(names) do set[n] = true end
  return set
end

-- The queues of names that no answer described, when the broker has them:
-- a Python RabiBridge server's, or a rabihost's that did not answer in time.
local function look_up_names(asker, by_queue, names)
  for _, name in ipairs(names or {}) do
    for _, ftype in ipairs { "async", "sync" } do
      local queue = wire.queue(ftype, name)
      if not by_queue[queue] then
        local counts, err = asker:queue(queue)
        if counts then
          by_queue[queue] = { name = name, ftype = ftype, queue = queue, known = false, hosts = array {},
                              consumers = counts.consumers, messages = counts.messages }
        elseif err.kind ~= "not_found" then
          return nil, err
        end
      end
    end
  end
  return true
end

local function gather(asker, opts)
  local answers, routed = asker:ask(core.json_encode { protocol = M.protocol }, opts.wait)
  if not answers then return nil, routed end
  local by_queue, answered = {}, 0
  for _, body in ipairs(answers) do
    local ok, is_answer = pcall(merge, by_queue, body)
    if ok and is_answer then answered = answered + 1 end
  end
  local ok, err = look_up_names(asker, by_queue, opts.names)
  if not ok then return nil, err end
  local wanted = wanted_set(opts.names)
  local list = {}
  for queue, e in pairs(by_queue) do
    if not wanted or wanted[e.name] then
      if e.consumers == nil then
        local counts, cerr = asker:queue(queue)
        if not counts and cerr.kind ~= "not_found" then return nil, cerr end
        -- Described, but gone from the broker: its host is declaring it again.
        e.consumers, e.messages = counts and counts.consumers or 0, counts and counts.messages or 0
      end
      list[#list + 1] = e
    end
  end
  table.sort(list, function(a, b)
    if a.name ~= b.name then return a.name < b.name end
    return tostring(a.ftype) < tostring(b.ftype)
  end)
  return array(list), { answered = answered, routed = routed, wait = opts.wait }
end

-- Misuse raises at discover's caller (init.lua tail-calls discover), naming the option.
local function check_opts(opts)
  local function bad(fmt, ...) error("discover: " .. fmt:format(...), 4) end
  if opts == nil then return { wait = M.default_wait } end
  if type(opts) ~= "table" then bad("options must be a table, got %s", type(opts)) end
  for k in pairs(opts) do
    if k ~= "wait" and k ~= "names" then
      bad("unknown option '%s'%s", tostring(k), require("rabibridge.suggest").hint(k, { "wait", "names" }))
    end
  end
  local wait = opts.wait == nil and M.default_wait or opts.wait
  if type(wait) ~= "number" or not (wait >= 0) or wait == math.huge then
    bad("option 'wait': a finite number of seconds >= 0 expected, got %s", tostring(wait))
  end
  local names = opts.names
  if names ~= nil then
    if type(names) ~= "table" then bad("option 'names': an array of function names expected, got %s", type(names)) end
    for i, n in ipairs(names) do
      if type(n) ~= "string" or n == "" or #n > 200 then
        bad("option 'names': names[%d] is not a function name", i)
      end
    end
  end
  return { wait = wait, names = names }
end

-- client: a rabibridge Client (its settings say which broker). -> list,
-- summary | nil, error (see rabi.discover in init.lua)
function M.discover(client, opts)
  if type(client) ~= "table" or type(client.settings) ~= "table" then
    error(("discover: bad argument #1: a client (rabi.client{...}) expected, got %s"):format(type(client)), 2)
  end
  local o = check_opts(opts)
  local s = client.settings
  local asker, err = core.discovery_open(s.url, {
    heartbeat = s.heartbeat, connect_timeout = s.connect_timeout, max_body = s.max_body, tls = s.tls,
    name = "rabihost list",
  })
  if not asker then return nil, err end
  local ok, list, summary = pcall(gather, asker, o)
  asker:close()
  if not ok then error(list, 0) end
  return list, summary
end

-- ---- the table rabihost list prints ----

local function params_text(e)
  if not e.known then return "?" end
  if type(e.params) ~= "table" then return "..." end
  if #e.params == 0 then return "(none)" end
  local parts = {}
  for i, p in ipairs(e.params) do parts[i] = tostring(p) end
  return table.concat(parts, ", ")
end

local function arguments_text(e)
  if not e.known then return "?" end
  local keys, parts = {}, {}
  for k in pairs(e.queue_arguments or {}) do keys[#keys + 1] = k end
  table.sort(keys)
  for i, k in ipairs(keys) do
    local v = e.queue_arguments[k]
    parts[i] = k .. "=" .. (type(v) == "number" and ("%d"):format(v) or tostring(v))
  end
  return table.concat(parts, " ")
end

-- "host (pid P, N workers)" for each rabihost serving it, in the order met.
local function hosts_text(e)
  if not e.known then return "not a rabihost (no description)" end
  local groups, order = {}, {}
  for _, h in ipairs(e.hosts) do
    local key = ("%s (pid %s"):format(tostring(h.host), tostring(h.supervisor or h.pid))
    if not groups[key] then
      groups[key] = 0
      order[#order + 1] = key
    end
    groups[key] = groups[key] + 1
  end
  local parts = {}
  for i, key in ipairs(order) do
    parts[i] = ("%s, %d worker%s)"):format(key, groups[key], groups[key] == 1 and "" or "s")
  end
  return table.concat(parts, "; ")
end

local function count_text(n)
  return type(n) == "number" and ("%d"):format(n) or tostring(n)
end

-- The listing as a table for people: one row per function.
function M.format_table(list)
  local rows = { { "FUNCTION", "FTYPE", "PARAMS", "CONSUMERS", "WAITING", "QUEUE ARGUMENTS", "HOSTS" } }
  for _, e in ipairs(list) do
    rows[#rows + 1] = {
      e.name .. (e.differs and " (!)" or ""), tostring(e.ftype), params_text(e), count_text(e.consumers),
      count_text(e.messages), arguments_text(e), hosts_text(e),
    }
  end
  local widths = {}
  for _, r in ipairs(rows) do
    for i, cell in ipairs(r) do widths[i] = math.max(widths[i] or 0, #cell) end
  end
  local out = {}
  for _, r in ipairs(rows) do
    local cells = {}
    for i, cell in ipairs(r) do
      cells[i] = i == #r and cell or cell .. (" "):rep(widths[i] - #cell)
    end
    out[#out + 1] = table.concat(cells, "  ")
  end
  return table.concat(out, "\n") .. "\n"
end

return M

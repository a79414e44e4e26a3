-- A worker: load the service scripts, connect, declare and consume every
-- registered function, then hand over to the lifecycle in C (host/worker.c:
-- serving, reconnecting, draining, stopping) until told to stop.
local core = require "rabibridge.core"
local service = require "rabibridge.service"
local rabi = require "rabibridge"

local log = rabi.log
local M = {}

-- Every *.lua under the given paths (files or folders, recursively), sorted
-- so that load order does not depend on the file system.
function M.find_scripts(paths)
  local out = {}
  local function walk(path)
    local entries = core.list_dir(path)
    if not entries then
      if path:match("%.lua$") then out[#out + 1] = path end
      return
    end
    table.sort(entries, function(a, b) return a.name < b.name end)
    for _, e in ipairs(entries) do
      local full = path:gsub("/$", "") .. "/" .. e.name
      if e.dir then walk(full)
      elseif e.name:match("%.lua$") then out[#out + 1] = full end
    end
  end
  for _, p in ipairs(paths) do walk(p) end
  return out
end

-- Loads each script in its own protected call: one broken script is
-- reported with its file and line, and the others still serve.
-- -> number of scripts that failed
function M.load_scripts(paths)
  local failed = 0
  local scripts = M.find_scripts(paths)
  if #scripts == 0 then log.warn("no *.lua service scripts under %s", table.concat(paths, ", ")) end
  for _, file in ipairs(scripts) do
    local chunk, err = loadfile(file)
    local ok = chunk ~= nil
    if ok then ok, err = xpcall(chunk, debug.traceback) end
    if not ok then
      failed = failed + 1
      log.error("cannot load %s: %s", file, tostring(err))
    else
      log.debug("loaded %s", file)
    end
  end
  return failed
end

-- A function's queue as the app's settings complete it: its own
-- queue_type, auto_delete and delivery_limit, else the app's. A quorum
-- queue is never auto-delete (RabbitMQ refuses it), so the app's
-- queue_auto_delete applies to classic queues only, unless it was set
-- explicitly: then the combination is refused, as an auto_delete of the
-- function's own is by register_call. -> nil | message
local function complete_queue(spec, settings)
  spec.queue_type = spec.queue_type or settings.queue_type
  if spec.queue_type ~= "quorum" then
    if spec.auto_delete == nil then spec.auto_delete = settings.queue_auto_delete end
    return nil
  end
  if spec.auto_delete then return "a quorum queue cannot be auto_delete (RabbitMQ refuses it)" end
  if spec.auto_delete == nil and settings.queue_auto_delete and settings.sources.queue_auto_delete ~= "default" then
    return ("app.queue_auto_delete = true (%s) and queue_type = \"quorum\": RabbitMQ refuses auto-delete"
      .. " quorum queues; set queue_auto_delete = false"):format(settings.sources.queue_auto_delete)
  end
  spec.auto_delete = false
  spec.delivery_limit = spec.delivery_limit or settings.delivery_limit
end

-- rabihost list asks the workers what they serve (rabibridge.discovery).
-- Not answering costs the listing only, never the serving.
local function answer_discovery(srv, served)
  local ok, err = pcall(function() srv:answer_discovery(require("rabibridge.discovery").answer(served)) end)
  if not ok then log.warn("discovery: rabihost list will not see this worker: %s", tostring(err)) end
end

-- The HTTP gateway of this worker, when http.listen is set: on the socket
-- the supervisor opened (opts.http_fd). -> gateway | nil | false (failed)
local function start_gateway(settings, opts)
  if not settings.http or not settings.http.listen then return nil end
  local gw, err = require("rabibridge.gateway").start(settings.http, opts.http_fd)
  if not gw then
    log.error("cannot start the HTTP gateway on %s: %s", settings.http.listen, err.message)
    return false
  end
  return gw
end

-- settings: resolved config; opts: { paths=, drain_timeout=, strict=,
-- keep_going=, http_fd=, gateway_only= }. -> exit code
function M.run(settings, opts)
  service.serialiser = settings.serialiser
  local failed = (opts.gateway_only and #opts.paths == 0) and 0 or M.load_scripts(opts.paths)
  if failed > 0 and opts.strict then
    -- A reload with a broken script: the running generation keeps serving.
    log.error("not serving the new code: %d script%s failed to load", failed, failed == 1 and "" or "s")
    return 65
  end
  if failed > 0 and not opts.keep_going then
    -- Serving part of the functions hides the failure until a caller
    -- finds one missing; stopping at start says it at once.
    log.error("not serving: %d script%s failed to load (see above); fix %s, or pass --keep-going to serve"
      .. " the others", failed, failed == 1 and "" or "s", failed == 1 and "it" or "them")
    return 65
  end
  for _, hook in ipairs(rabi._start_hooks) do
    local ok, err = xpcall(hook, debug.traceback)
    if not ok then
      log.error("on_start hook failed, stopping this worker: %s", tostring(err))
      return 3
    end
  end
  local srv, err = core.server_open(settings.url, {
    heartbeat = settings.heartbeat, connect_timeout = settings.connect_timeout,
    compress_threshold = settings.compress_threshold, max_body = settings.max_body,
    name = "rabihost worker " .. core.process_info().worker, tls = settings.tls,
    stats_interval = settings.metrics and settings.metrics_interval or 0,
    -- Worker n connects to node n of a cluster first (wrapping round).
    first_url = math.max(core.process_info().worker, 0),
  })
  if not srv then
    log.error("%s", err.message)
    return 2
  end
  -- Each function consumes on a channel of its own, and a broker closes a
  -- connection that opens more than its channel_max: refused here, once,
  -- rather than served until the broker cuts every function off.
  local max_functions, channel_max = srv:max_functions()
  if #service.registered > max_functions then
    log.error("not serving: this worker registers %d functions, but the broker allows %d channels per connection"
      .. " (its channel_max), one for each function and 3 for the host: at most %d functions per worker."
      .. " Serve them from several rabihost processes (one per services folder), or raise channel_max"
      .. " in rabbitmq.conf", #service.registered, channel_max, max_functions)
    srv:close()
    return 78
  end
  -- First, so that the requests which expire in the function queues have
  -- somewhere to go as soon as those exist.
  local aok, aerr = srv:answer_timeouts { dispatch = service.answer_timeout }
  if not aok then log.error("cannot answer expired requests (queue %s): %s", core.wire.expired_queue, aerr.message) end
  local expires = tonumber(settings.queue_expires)
  if not expires or expires < 0 then
    log.error("app.queue_expires must be a number of seconds (0: never), got %s", tostring(settings.queue_expires))
    return 78
  end
  local gw = start_gateway(settings, opts)
  if gw == false then
    srv:close()
    return 78
  end
  local names, served = {}, {}
  -- The gateway alone serves no function (its scripts give routes).
  for _, spec in ipairs(opts.gateway_only and {} or service.registered) do
    local qerr = complete_queue(spec, settings)
    spec.expires_ms = math.floor(expires * 1000)
    local ok, serr, retrying = false, { message = qerr }, false
    if not qerr then ok, serr, retrying = srv:serve(spec) end
    if ok then
      names[#names + 1] = spec.name
      served[#served + 1] = spec
    else
      local why = serr.message
      if why:match("PRECONDITION_FAILED") then
        why = why .. (" -- the queue %s exists with other arguments; set re_register = true"
          .. " or delete the queue"):format(spec.queue)
      end
      -- Refused by the broker on a live link: the host declares it again
      -- after 1 s, then 2, 4, ... up to 30 s, and logs when it serves.
      log.error("cannot serve %s (%s): %s%s", spec.name, spec.source, why,
        retrying and "; retrying in 1 s, then with a pause that doubles up to 30 s" or "")
    end
  end
  if not opts.gateway_only then
    answer_discovery(srv, served)
    log.info("serving %d function%s on %s: %s", #names, #names == 1 and "" or "s",
      require("rabibridge.config").mask_url(settings.url), table.concat(names, ", "))
  end
  core.worker_serve(srv, { drain_timeout = opts.drain_timeout or 30, http = gw and gw.server or nil })
  if gw then gw:close() end
  srv:close()
  return 0
end

return M

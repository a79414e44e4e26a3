-- A worker: load the service scripts, connect, declare and consume every
-- registered function, serve until told to stop, then drain.
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

-- Reconnects in this process with capped exponential backoff, serving the
-- calls already in flight meanwhile. -> true once serving again, false when
-- asked to stop first.
function M.reconnect(srv)
  local delay = 0.1
  while true do
    log.warn("broker connection lost; reconnecting in %.1f s", delay)
    local deadline = core.now() + delay
    while core.now() < deadline do
      core.run_once(deadline - core.now())
      if core.stopping() == 1 then return false end
    end
    local ok, err = srv:reconnect()
    if ok then
      core.clear_lost()
      log.info("reconnected; serving again")
      return true
    end
    log.warn("reconnection failed: %s", err)
    delay = math.min(delay * 2, 5)
  end
end

-- Stops consuming and lets the calls in flight finish. Where this worker is
-- the last consumer of an auto-delete queue, it first serves what waits in
-- it, since the queue goes with its last consumer.
local function drain(srv, timeout)
  local deadline = core.now() + timeout
  local held, next_check = srv:cancel(), 0
  while (held > 0 or srv:inflight() > 0) and core.now() < deadline do
    core.run_once(0.05)
    if held > 0 and core.now() >= next_check then
      held, next_check = srv:cancel(), core.now() + 0.1
    end
  end
  srv:cancel(true)
  local left = srv:inflight()
  if left > 0 then
    core.abandon()
    log.warn("drain timed out with %d call(s) in flight, left unacked: another worker consuming the same"
      .. " queue gets them again; if none does, the auto-delete queue is deleted with them", left)
  end
end

-- settings: resolved config; opts: { paths=, drain_timeout=, strict= }. -> exit code
function M.run(settings, opts)
  core.handle_stop_signals()
  service.serialiser = settings.serialiser
  local failed = M.load_scripts(opts.paths)
  if failed > 0 and opts.strict then
    -- A reload with a broken script: the running generation keeps serving.
    log.error("not serving the new code: %d script%s failed to load", failed, failed == 1 and "" or "s")
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
  })
  if not srv then
    log.error("%s", err)
    return 2
  end
  local names = {}
  for _, spec in ipairs(service.registered) do
    if spec.auto_delete == nil then spec.auto_delete = settings.queue_auto_delete end
    local ok, serr = srv:serve(spec)
    if ok then
      names[#names + 1] = spec.name
    else
      if serr:match("PRECONDITION_FAILED") then
        serr = serr .. (" -- the queue %s exists with other arguments; set re_register = true"
          .. " or delete the queue"):format(spec.queue)
      end
      log.error("cannot serve %s (%s): %s", spec.name, spec.source, serr)
    end
  end
  log.info("serving %d function%s on %s: %s", #names, #names == 1 and "" or "s",
    require("rabibridge.config").mask_url(settings.url), table.concat(names, ", "))
  core.notify_ready()
  while core.run() == "lost" do
    if not M.reconnect(srv) then break end
  end
  drain(srv, opts.drain_timeout or 30)
  srv:close()
  return 0
end

return M

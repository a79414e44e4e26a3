-- The rabihost command line. Parsing and the client-side commands live here;
-- the supervisor, the loop and the broker links are C.
local core = require "rabibridge.core"
local config = require "rabibridge.config"

local M = {}

local USAGE = [[
usage:
  rabihost [serve] [OPTIONS] [DIR...]   serve every *.lua under DIR (default ./services)
      -w, --workers N       worker processes (default 1; 0 = one per logical core)
      --bind-core           pin worker i to core i
      --reload              on a change under DIR, start workers with the new code, then drain the old
      --drain-timeout S     on SIGTERM, wait at most S seconds for calls in flight (default 30)
      -c, --config FILE     config file (default $RABIBRIDGE_CONFIG, then ./config/rabibridge.lua)
      --url URL             broker URL (default $RABIBRIDGE_URL, then amqp://guest:guest@localhost:5672/);
                            give it again for more brokers (a cluster's nodes), tried in turn
      --log-level LEVEL     DEBUG, INFO, WARN or ERROR
      --serialiser NAME     what a client sends: msgpack (default, as RabiBridge) or json;
                            a server answers each call in the serialiser it came in
  rabihost call NAME [ARG...] [--kwargs JSON] [--ftype sync|async] [--timeout S] [--url URL] [--traceback]
                                        ARGs are JSON values (a bare word is a string); prints the result as JSON
  rabihost run FILE.lua [ARG...]        run a Lua client script with rabibridge loaded
  rabihost repl                         interactive LuaJIT with rabi and a connected client
  rabihost encrypt-password [--secret S] PASSWORD
                                        print PASSWORD encrypted for the config file (secret: --secret,
                                        then $SECRET, then the config's secret section)
  rabihost show-config [-c FILE] [--url URL]
                                        print the effective settings and where each comes from
  rabihost --help | --version
]]

local function die(code, fmt, ...)
  io.stderr:write("rabihost: ", fmt:format(...), "\n")
  return code
end

-- Splits argv into options and positionals. spec: option name -> "flag" |
-- "value"; aliases map short forms. Options may come anywhere, "--" ends them.
local function parse(argv, first, spec, aliases)
  local opts, pos = {}, {}
  local i = first
  while i <= #argv do
    local a = argv[i]
    if a == "--" then
      for j = i + 1, #argv do pos[#pos + 1] = argv[j] end
      break
    end
    local name, inline = a:match("^%-%-([%w%-]+)=(.*)$")
    if not name then name = a:match("^%-%-([%w%-]+)$") or aliases[a] end
    if name and a:sub(1, 1) == "-" and a ~= "-" and not a:match("^%-%d") then
      local kind = spec[name]
      if not kind then return nil, ("unknown option %s"):format(a) end
      if kind == "flag" then
        opts[name] = true
      elseif kind == "list" then
        local v = inline
        if v == nil then
          i = i + 1
          v = argv[i]
          if v == nil then return nil, ("option --%s needs a value"):format(name) end
        end
        opts[name] = opts[name] and (opts[name] .. " " .. v) or v
      else
        local v = inline
        if v == nil then
          i = i + 1
          v = argv[i]
          if v == nil then return nil, ("option --%s needs a value"):format(name) end
        end
        opts[name] = v
      end
    else
      pos[#pos + 1] = a
    end
    i = i + 1
  end
  return opts, pos
end

local COMMON = { url = "list", config = "value", ["log-level"] = "value", serialiser = "value", help = "flag" }
local COMMON_ALIASES = { ["-c"] = "config", ["-h"] = "help" }

local function with_common(spec)
  local s = {}
  for k, v in pairs(COMMON) do s[k] = v end
  for k, v in pairs(spec) do s[k] = v end
  return s
end

local LEVELS = { DEBUG = true, INFO = true, WARN = true, ERROR = true }

-- Applies the options every command shares; -> settings | nil, message
local function common_settings(opts)
  local po = {}
  if opts.url then po.url = opts.url end
  if opts.config then po.config = opts.config end
  if opts.serialiser then po.serialiser = opts.serialiser end
  if opts["log-level"] then
    local lvl = opts["log-level"]:upper()
    if lvl == "WARNING" then lvl = "WARN" end
    if not LEVELS[lvl] then return nil, "--log-level must be DEBUG, INFO, WARN or ERROR" end
    po.log_level = lvl
  end
  config.process_options = po
  local ok, settings = pcall(config.resolve, {})
  if not ok then return nil, tostring(settings.message or settings) end
  local _, serr = require("rabibridge.serial").get(settings.serialiser)
  if serr then return nil, serr end
  local lvl = tostring(settings.log_level):upper()
  if lvl == "WARNING" then lvl = "WARN" end
  if settings.debug_mode then lvl = "DEBUG" end
  core.set_log_level(LEVELS[lvl] and lvl or "INFO")
  return settings
end

-- ---- serve ----

-- The folders --reload watches: each service folder and those below it (a
-- file given directly is watched through its folder).
local function watch_dirs(paths)
  local dirs = {}
  local function walk(dir)
    dirs[#dirs + 1] = dir
    for _, e in ipairs(core.list_dir(dir) or {}) do
      if e.dir then walk(dir:gsub("/$", "") .. "/" .. e.name) end
    end
  end
  for _, p in ipairs(paths) do
    if core.list_dir(p) then walk(p) else dirs[#dirs + 1] = p:match("^(.*)/[^/]*$") or "." end
  end
  return dirs
end

local function cmd_serve(argv, first)
  local opts, paths = parse(argv, first, with_common {
    workers = "value", ["bind-core"] = "flag", reload = "flag", ["drain-timeout"] = "value",
  }, { ["-c"] = "config", ["-h"] = "help", ["-w"] = "workers" })
  if not opts then return die(64, "%s (see rabihost --help)", paths) end
  if opts.help then io.stdout:write(USAGE) return 0 end
  local settings, err = common_settings(opts)
  if not settings then return die(78, "%s", err) end
  local workers = tonumber(opts.workers or "1")
  if not workers or workers < 0 or workers % 1 ~= 0 then return die(64, "--workers needs a whole number >= 0") end
  local drain_timeout = tonumber(opts["drain-timeout"] or "30")
  if not drain_timeout or drain_timeout < 0 then return die(64, "--drain-timeout needs a number of seconds") end
  if #paths == 0 then paths = { "services" } end
  for _, p in ipairs(paths) do
    if not core.list_dir(p) and not io.open(p, "r") then
      return die(66, "cannot read service path %s", p)
    end
  end
  local worker = require "rabibridge.worker"
  return core.supervise {
    workers = workers, bind_core = opts["bind-core"], drain_timeout = drain_timeout,
    watch = opts.reload and watch_dirs(paths) or nil,
    worker = function(_, strict)
      return worker.run(settings, { paths = paths, drain_timeout = drain_timeout, strict = strict })
    end,
  }
end

-- ---- call ----

local function cmd_call(argv, first)
  local opts, pos = parse(argv, first, with_common {
    kwargs = "value", ftype = "value", timeout = "value", traceback = "flag",
  }, COMMON_ALIASES)
  if not opts then return die(64, "%s (see rabihost --help)", pos) end
  if opts.help or #pos == 0 then
    io.stdout:write(USAGE)
    return opts.help and 0 or 64
  end
  local settings, err = common_settings(opts)
  if not settings then return die(78, "%s", err) end
  local serial = require "rabibridge.serial"
  local name = pos[1]
  local args = setmetatable({}, serial.array_mt)
  for i = 2, #pos do
    local ok, v = pcall(serial.decode, pos[i])
    if not ok then v = pos[i] end
    args[#args + 1] = v
  end
  local kwargs = {}
  if opts.kwargs then
    local ok, v = pcall(serial.decode, opts.kwargs)
    if not ok or type(v) ~= "table" or (next(v) ~= nil and getmetatable(v) == serial.array_mt) then
      return die(64, "--kwargs must be a JSON object, got %s", opts.kwargs)
    end
    kwargs = v
  end
  local timeout = tonumber(opts.timeout or "30")
  if not timeout then return die(64, "--timeout needs a number of seconds") end
  local rabi = require "rabibridge"
  local client = rabi.client { timeout = timeout }
  local ok, cerr = pcall(client.connect, client)
  if not ok then return die(69, "%s", tostring(cerr)) end
  local success, code, result = client:try_remote_call(name, args, kwargs, opts.ftype)
  client:close()
  if not success then
    io.stderr:write("error: ", result.kind, ": ", result.message, "\n")
    return 1
  end
  if code ~= 0 then
    -- The exception (a Python traceback's last line); the whole remote
    -- traceback follows with --traceback.
    local text = tostring(result)
    local message = serial.remote_message(text)
    io.stderr:write("error: remote: ", message, "\n")
    if opts.traceback then
      if text:sub(1, #message) == message then text = text:sub(#message + 2) end
      io.stderr:write(text, "\n")
    end
    return 1
  end
  local enc_ok, out = pcall(serial.encode, result == nil and serial.null or result)
  io.stdout:write(enc_ok and out or tostring(result), "\n")
  return 0
end

-- ---- run ----

local function cmd_run(argv, first)
  local file = argv[first]
  if not file or file == "--help" or file == "-h" then
    io.stdout:write(USAGE)
    return file and 0 or 64
  end
  local settings, err = common_settings({})
  if not settings then return die(78, "%s", err) end
  local script_args = { [0] = file }
  for i = first + 1, #argv do script_args[#script_args + 1] = argv[i] end
  _G.arg = script_args
  local chunk, lerr = loadfile(file)
  if not chunk then return die(66, "%s", lerr) end
  local ok, rerr = xpcall(function() return chunk(unpack(script_args)) end, function(e)
    return debug.traceback(tostring(e), 2)
  end)
  if not ok then
    io.stderr:write(tostring(rerr), "\n")
    return 1
  end
  return 0
end

-- ---- repl ----

local function show(...)
  local n = select("#", ...)
  if n == 0 then return end
  local serial = require "rabibridge.serial"
  local parts = {}
  for i = 1, n do
    local v = select(i, ...)
    -- Tables as JSON, and numbers too: JSON keeps every digit of an
    -- integer, where tostring() rounds to 14.
    if (type(v) == "table" and not require("rabibridge").is_error(v)) or type(v) == "number" then
      local ok, s = pcall(serial.encode, v)
      parts[i] = ok and s or tostring(v)
    else
      parts[i] = tostring(v)
    end
  end
  io.stdout:write(table.concat(parts, "\t"), "\n")
end

local function cmd_repl(argv, first)
  local opts, pos = parse(argv, first, COMMON, COMMON_ALIASES)
  if not opts then return die(64, "%s", pos) end
  if opts.help then io.stdout:write(USAGE) return 0 end
  local settings, err = common_settings(opts)
  if not settings then return die(78, "%s", err) end
  local rabi = require "rabibridge"
  local client = rabi.client()
  local ok, cerr = pcall(client.connect, client)
  io.stdout:write(("rabibridge %s on %s -- `rabi` and `client` are ready; client.fn.NAME(...) calls NAME\n")
    :format(core.version, config.mask_url(settings.url)))
  if not ok then io.stdout:write("warning: not connected: ", tostring(cerr), "\n") end
  _G.rabi, _G.client = rabi, client
  local buffer = nil
  while true do
    local line = core.readline(buffer and ">> " or "> ")
    if not line then break end
    buffer = buffer and (buffer .. "\n" .. line) or line
    local chunk, perr = loadstring("return " .. buffer, "=repl")
    if not chunk then chunk, perr = loadstring(buffer, "=repl") end
    if not chunk and perr:match("<eof>") then
      -- incomplete statement: keep reading
    else
      buffer = nil
      if not chunk then
        io.stdout:write(perr, "\n")
      else
        show(select(2, xpcall(chunk, function(e)
          if rabi.is_error(e) then return e end
          return debug.traceback(tostring(e), 2)
        end)))
      end
    end
  end
  io.stdout:write("\n")
  client:close()
  return 0
end

-- ---- credentials and settings ----

local function cmd_encrypt_password(argv, first)
  local opts, pos = parse(argv, first, with_common { secret = "value" }, COMMON_ALIASES)
  if not opts then return die(64, "%s", pos) end
  if opts.help or #pos ~= 1 then
    io.stdout:write("usage: rabihost encrypt-password [--secret S] PASSWORD\n")
    return opts.help and 0 or 64
  end
  local secret = opts.secret or os.getenv("SECRET")
  if not secret or secret == "" then
    local path = config.find_file(opts.config and { config = opts.config } or {})
    local cfg = path and config.load_file(path)
    secret = cfg and cfg.secret and cfg.secret.secret
  end
  if not secret or secret == "" then
    return die(64, "no secret: pass --secret S, set SECRET, or put secret = { secret = ... } in the config")
  end
  io.stdout:write(core.encrypt_password(pos[1], secret), "\n")
  return 0
end

local function cmd_show_config(argv, first)
  local opts, pos = parse(argv, first, COMMON, COMMON_ALIASES)
  if not opts then return die(64, "%s", pos) end
  local settings, err = common_settings(opts)
  if not settings then return die(78, "%s", err) end
  local keys = {}
  for k in pairs(settings) do
    if k ~= "sources" then keys[#keys + 1] = k end
  end
  table.sort(keys)
  for _, k in ipairs(keys) do
    local v = settings[k]
    if k == "url" then v = config.mask_url(v) end
    if type(v) == "table" then v = require("rabibridge.serial").encode(v) end
    io.stdout:write(("%-20s %-40s (%s)\n"):format(k, tostring(v), settings.sources[k] or "option"))
  end
  return 0
end

local COMMANDS = {
  serve = cmd_serve, call = cmd_call, run = cmd_run, repl = cmd_repl,
  ["encrypt-password"] = cmd_encrypt_password, ["show-config"] = cmd_show_config,
}

function M.main(argv)
  local cmd = argv[1]
  if cmd == "--version" or cmd == "-V" then
    io.stdout:write("rabihost ", core.version, "\n")
    return 0
  end
  if cmd == "--help" or cmd == "-h" or cmd == "help" then
    io.stdout:write(USAGE)
    return 0
  end
  local handler = COMMANDS[cmd]
  if handler then return handler(argv, 2) end
  if cmd and not cmd:match("^%-") and not core.list_dir(cmd) and not cmd:match("%.lua$") then
    if cmd:find("/", 1, true) then return die(66, "cannot read service path %s", cmd) end
    return die(64, "unknown command '%s' (see rabihost --help; to serve a folder of that name: rabihost serve %s)",
      cmd, cmd)
  end
  return cmd_serve(argv, 1)
end

return M

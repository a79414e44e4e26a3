-- The rabihost command line. Parsing and the client-side commands live here;
-- the supervisor, the loop and the broker links are C.
local core = require "rabibridge.core"
local config = require "rabibridge.config"
local wire = require "rabibridge.wire"

local M = {}

local help = require "rabibridge.help"

local function die(code, fmt, ...)
  io.stderr:write("rabihost: ", fmt:format(...), "\n")
  return code
end

-- Splits argv into options and positionals. spec: option name -> "flag" |
-- "value" | "list"; aliases map short forms. Options may come anywhere, "--"
-- ends them; with stop, so does the first positional (run's script takes the
-- rest).
local function parse(argv, first, spec, aliases, stop)
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
      if not kind then
        local near = a:sub(1, 2) == "--" and require("rabibridge.suggest").closest(name, spec)
        return nil, ("unknown option %s%s"):format(a, near and (" (did you mean --%s?)"):format(near) or "")
      end
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
    elseif stop then
      for j = i, #argv do pos[#pos + 1] = argv[j] end
      break
    else
      pos[#pos + 1] = a
    end
    i = i + 1
  end
  return opts, pos
end

-- The parser's spec and aliases for a list of options of the help table:
-- what the help documents is exactly what the parser accepts.
local function spec_of(options, spec, aliases)
  spec, aliases = spec or {}, aliases or {}
  for _, o in ipairs(options) do
    spec[o.long] = o.list and "list" or o.arg and "value" or "flag"
    if o.short then aliases["-" .. o.short] = o.long end
  end
  return spec, aliases
end

local _, COMMON_ALIASES = spec_of(help.common)

-- A command's own options and those of every command.
local function command_spec(name)
  local spec, aliases = spec_of(help.common)
  return spec_of(help.command(name).options, spec, aliases)
end

local LEVELS = { DEBUG = true, INFO = true, WARN = true, ERROR = true }
local FORMATS = { text = true, json = true }

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
  if opts["log-format"] then
    local fmt = opts["log-format"]:lower()
    if not FORMATS[fmt] then return nil, "--log-format must be text or json" end
    po.log_format = fmt
    -- At once, so that the config's own warnings come in this format too.
    core.set_log_format(fmt)
  end
  if opts["access-log"] then po.access_log = true end
  config.process_options = po
  local ok, settings = pcall(config.resolve, {})
  if not ok then return nil, tostring(settings.message or settings) end
  local _, serr = require("rabibridge.serial").get(settings.serialiser)
  if serr then return nil, serr end
  local lvl = tostring(settings.log_level):upper()
  if lvl == "WARNING" then lvl = "WARN" end
  if settings.debug_mode then lvl = "DEBUG" end
  core.set_log_level(LEVELS[lvl] and lvl or "INFO")
  local fmt = tostring(settings.log_format):lower()
  if not FORMATS[fmt] then
    return nil, ("log_format must be text or json, got '%s' (%s)"):format(tostring(settings.log_format),
      settings.sources.log_format or "option")
  end
  core.set_log_format(fmt)
  core.set_access_log(settings.access_log == true)
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

-- The watchdog's limits (host/watchdog.h): a flag, else the config's app
-- section, else the default. -> { stall_limit =, ... } | nil, message
local LIMITS = {
  { flag = "stall-limit", key = "stall_limit", what = "a number of seconds >= 0" },
  { flag = "delivery-limit", key = "delivery_limit", what = "a whole number >= 0", whole = true },
  { flag = "heap-limit", key = "heap_limit", what = "a number of MiB >= 0" },
}

local function watchdog_limits(opts, settings)
  local out = {}
  for _, l in ipairs(LIMITS) do
    local v = settings[l.key]
    if opts[l.flag] ~= nil then v = tonumber(opts[l.flag]) end
    if type(v) ~= "number" or not (v >= 0) or v == math.huge or (l.whole and v % 1 ~= 0) then
      return nil, ("--%s (app.%s) needs %s, got %s"):format(l.flag, l.key, l.what, tostring(opts[l.flag] or v))
    end
    out[l.key] = v
  end
  return out
end

-- The HTTP gateway's flags over the config's http section. -> nil | message
local function http_options(opts, settings, gateway_only)
  local over = {}
  if opts.http then over.listen = opts.http end
  if opts.listen then over.listen = opts.listen end
  if opts["tls-cert"] then over.tls_cert = opts["tls-cert"] end
  if opts["tls-key"] then over.tls_key = opts["tls-key"] end
  if next(over) == nil and not gateway_only then return nil end
  local file = {}
  if settings.config_file then file = (config.load_file(settings.config_file) or {}).http or {} end
  local http, src, err = config.http_settings(file, over)
  if not http then return err end
  if gateway_only and not http.listen then return "gateway needs --listen HOST:PORT (or http.listen in the config)" end
  settings.http, settings.sources.http = http, src
end

-- The listening socket of the gateway, opened before the workers fork so
-- that they all accept on it: a bind error (a port in use) stops the start
-- with one message, a worker restarted or reloaded inherits it and no
-- connection is refused meanwhile, and no other process can join the port
-- as SO_REUSEPORT would let any process of the same user do.
-- -> fd | nil, message
local function http_socket(settings)
  if not settings.http or not settings.http.listen then return nil end
  local fd, port = core.http_listen_socket(settings.http.listen)
  if not fd then return nil, ("cannot listen on %s: %s"):format(settings.http.listen, port.message) end
  core.log("INFO", ("HTTP gateway on %s://%s (port %d)"):format(settings.http.tls_cert and "https" or "http",
    settings.http.listen, port))
  return fd
end

local function cmd_serve(argv, first, gateway_only)
  local name = gateway_only and "gateway" or "serve"
  local opts, paths = parse(argv, first, command_spec(name))
  if not opts then return die(64, "%s (see rabihost %s --help)", paths, name) end
  local settings, err = common_settings(opts)
  if not settings then return die(78, "%s", err) end
  local herr = http_options(opts, settings, gateway_only)
  if herr then return die(gateway_only and not settings.http and 64 or 78, "%s", herr) end
  local workers = tonumber(opts.workers or "1")
  if not workers or workers < 0 or workers % 1 ~= 0 then return die(64, "--workers needs a whole number >= 0") end
  local drain_timeout = tonumber(opts["drain-timeout"] or "30")
  if not drain_timeout or drain_timeout < 0 then return die(64, "--drain-timeout needs a number of seconds") end
  if opts.metrics then settings.metrics, settings.sources.metrics = opts.metrics, "option" end
  local metrics = settings.metrics
  if metrics ~= false and (type(metrics) ~= "string" or not metrics:match("^.+:%d+$")) then
    return die(64, "--metrics needs HOST:PORT (app.metrics in the config), got %s", tostring(metrics))
  end
  local interval = tonumber(settings.metrics_interval)
  if not interval or interval <= 0 then
    return die(78, "app.metrics_interval must be a positive number of seconds, got %s",
      tostring(settings.metrics_interval))
  end
  settings.metrics_interval = interval
  local limits, lerr = watchdog_limits(opts, settings)
  if not limits then return die(64, "%s", lerr) end
  if #paths == 0 and not gateway_only then paths = { "services" } end
  for _, p in ipairs(paths) do
    if not core.list_dir(p) and not io.open(p, "r") then
      return die(66, "cannot read service path %s", p)
    end
  end
  local http_fd, ferr = http_socket(settings)
  if ferr then return die(78, "%s", ferr) end
  local worker = require "rabibridge.worker"
  local code, serr = core.supervise {
    workers = workers, bind_core = opts["bind-core"], drain_timeout = drain_timeout,
    watch = opts.reload and watch_dirs(paths) or nil, metrics = metrics or nil,
    stall_limit = limits.stall_limit, delivery_limit = limits.delivery_limit, heap_limit = limits.heap_limit,
    worker = function(_, strict)
      return worker.run(settings, { paths = paths, drain_timeout = drain_timeout, strict = strict,
                                    keep_going = opts["keep-going"], http_fd = http_fd,
                                    gateway_only = gateway_only })
    end,
  }
  if not code then return die(78, "%s", serr) end
  return code
end

-- ---- call ----

local function cmd_call(argv, first)
  local opts, pos = parse(argv, first, command_spec "call")
  if not opts then return die(64, "%s (see rabihost call --help)", pos) end
  if #pos == 0 then return die(64, "call needs the name of a function (see rabihost call --help)") end
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

-- ---- list ----

local function cmd_list(argv, first)
  local opts, names = parse(argv, first, command_spec "list")
  if not opts then return die(64, "%s (see rabihost list --help)", names) end
  local wait = tonumber(opts.wait or "0.5")
  if not wait or wait < 0 or wait == math.huge then return die(64, "--wait needs a number of seconds >= 0") end
  local settings, err = common_settings(opts)
  if not settings then return die(78, "%s", err) end
  local rabi = require "rabibridge"
  local discovery = require "rabibridge.discovery"
  local list, summary = rabi.discover(rabi.client(), { wait = wait, names = #names > 0 and names or nil })
  if not list then
    if summary.kind == "connection" then return die(69, "%s", summary.message) end
    return die(64, "%s", tostring(summary))
  end
  local code = 0
  for _, name in ipairs(names) do
    local found = false
    for _, f in ipairs(list) do found = found or f.name == name end
    if not found then
      io.stderr:write(("rabihost: no function %s is served: the broker has no queue %s or %s\n"):format(name,
        wire.queue("async", name), wire.queue("sync", name)))
      code = 1
    end
  end
  if opts.json then
    io.stdout:write(core.json_encode { functions = list, answered = summary.answered }, "\n")
    return code
  end
  if #list > 0 then io.stdout:write(discovery.format_table(list)) end
  if not summary.routed then
    io.stderr:write("no rabihost answered: none serves on this broker (Python RabiBridge servers do not answer;"
      .. " name a function to look up its queue)\n")
  else
    io.stderr:write(("%d rabihost worker%s answered within %g s.%s\n"):format(summary.answered,
      summary.answered == 1 and "" or "s", wait, #names == 0
        and " Python RabiBridge servers do not answer: name a function (rabihost list NAME) to look up its queue."
        or ""))
  end
  return code
end

-- ---- run ----

-- The names a script registered with register_call, if any: such a script
-- is a service, and run would only load it and exit.
local function registered_names()
  local names = {}
  for _, spec in ipairs(require("rabibridge.service").registered) do names[#names + 1] = spec.name end
  return names
end

local function cmd_run(argv, first)
  local spec, aliases = command_spec "run"
  local opts, pos = parse(argv, first, spec, aliases, true)
  if not opts then return die(64, "%s (see rabihost run --help)", pos) end
  local file = pos[1]
  if not file then return die(64, "run needs a Lua script (see rabihost run --help)") end
  local settings, err = common_settings(opts)
  if not settings then return die(78, "%s", err) end
  local script_args = { [0] = file }
  for i = 2, #pos do script_args[#script_args + 1] = pos[i] end
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
  local names = registered_names()
  if #names > 0 then
    return die(64, "%s is a service (it registers %s): serve it with rabihost serve %s",
      file, table.concat(names, ", "), file)
  end
  return 0
end

-- ---- repl ----

local function cmd_repl(argv, first)
  local opts, pos = parse(argv, first, command_spec "repl")
  if not opts then return die(64, "%s (see rabihost repl --help)", pos) end
  if #pos > 0 then return die(64, "repl takes no arguments, got %s (see rabihost repl --help)", pos[1]) end
  local settings, err = common_settings(opts)
  if not settings then return die(78, "%s", err) end
  return require("rabibridge.repl").run(settings)
end

-- ---- credentials and settings ----

local function cmd_encrypt_password(argv, first)
  local opts, pos = parse(argv, first, command_spec "encrypt-password", COMMON_ALIASES)
  if not opts then return die(64, "%s (see rabihost encrypt-password --help)", pos) end
  if #pos ~= 1 then
    return die(64, "encrypt-password needs one PASSWORD, or - to read it from stdin"
      .. " (see rabihost encrypt-password --help)")
  end
  local password = pos[1]
  if password == "-" then
    password = io.stdin:read("*l")
    if not password then return die(64, "encrypt-password: no password on stdin") end
  end
  local secret = opts.secret or os.getenv("SECRET")
  if not secret or secret == "" then
    local path = config.find_file(opts.config and { config = opts.config } or {})
    if path then
      local cfg, err = config.load_file(path)
      if not cfg then return die(78, "%s", err) end
      secret = cfg.secret and cfg.secret.secret
    end
  end
  if not secret or secret == "" then
    return die(64, "no secret: pass --secret S, set SECRET, or set SECRET in the config's [secret] section")
  end
  io.stdout:write(core.encrypt_password(password, tostring(secret)), "\n")
  return 0
end

local function cmd_show_config(argv, first)
  local opts, pos = parse(argv, first, command_spec "show-config")
  if not opts then return die(64, "%s (see rabihost show-config --help)", pos) end
  if #pos > 0 then
    return die(64, "show-config takes no arguments, got %s (see rabihost show-config --help)", pos[1])
  end
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
    if k == "http" and v.token then
      local shown = {}
      for hk, hv in pairs(v) do shown[hk] = hv end
      shown.token = "****" -- never the secret itself
      v = shown
    end
    if type(v) == "table" then v = require("rabibridge.serial").encode(v) end
    io.stdout:write(("%-20s %-40s (%s)\n"):format(k, tostring(v), settings.sources[k] or "option"))
  end
  return 0
end

local COMMANDS = {
  serve = cmd_serve, gateway = function(argv, first) return cmd_serve(argv, first, true) end, call = cmd_call, list = cmd_list, run = cmd_run, repl = cmd_repl,
  ["encrypt-password"] = cmd_encrypt_password, ["show-config"] = cmd_show_config,
}

-- Whether argv asks for a command's help: -h or --help before "--" (run's
-- own options end at its script, and parses them itself).
local function asks_help(argv, first)
  for i = first, #argv do
    local a = argv[i]
    if a == "--" then return false end
    if a == "--help" or a == "-h" then return true end
  end
  return false
end

local function run_command(name, argv, first)
  if name ~= "run" and asks_help(argv, first) then
    io.stdout:write(help.command_usage(name))
    return 0
  end
  if name == "run" then
    local spec, aliases = command_spec "run"
    local opts = parse(argv, first, spec, aliases, true)
    if opts and opts.help then
      io.stdout:write(help.command_usage(name))
      return 0
    end
  end
  return COMMANDS[name](argv, first)
end

-- The parser, for the specs that check it without a process.
M.parse, M.command_spec = parse, command_spec

function M.main(argv)
  -- Services, scripts and the REPL all wait inside their own coroutines.
  require("rabibridge")._install_coroutine()
  local cmd = argv[1]
  if cmd == "--version" or cmd == "-V" then
    io.stdout:write("rabihost ", core.version, "\n")
    return 0
  end
  if cmd == "--help" or cmd == "-h" or cmd == "help" then
    local about = argv[2]
    if cmd == "help" and about then
      if not COMMANDS[about] then return die(64, "no command '%s' (see rabihost --help)", about) end
      io.stdout:write(help.command_usage(about))
    else
      io.stdout:write(help.usage())
    end
    return 0
  end
  if COMMANDS[cmd] then return run_command(cmd, argv, 2) end
  if cmd and not cmd:match("^%-") and not core.list_dir(cmd) and not cmd:match("%.lua$") then
    if cmd:find("/", 1, true) then return die(66, "cannot read service path %s", cmd) end
    return die(64, "unknown command '%s' (see rabihost --help; to serve a folder of that name: rabihost serve %s)",
      cmd, cmd)
  end
  return run_command("serve", argv, 1)
end

return M

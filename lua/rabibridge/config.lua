-- Connection and app settings, from first to last: explicit options
-- (command-line flags), the environment, the config file, then RabbitMQ's
-- own default URL. Every resolved value remembers where it came from.
--
-- A config file is Lua (config/rabibridge.lua) or TOML, chosen by its
-- extension. A TOML file may be RabiBridge's own config/env.toml as it is:
-- its keys are read without regard to case, and [rabbitmq]'s RABBITMQ_
-- prefix is dropped, so RABBITMQ_HOST is rabbitmq.host and LOG_LEVEL is
-- app.log_level.
local core = require "rabibridge.core"
local suggest = require "rabibridge.suggest"

local M = {}

local DEFAULT_URL = "amqp://guest:guest@localhost:5672/"

local APP_DEFAULTS = {
  log_level = "INFO", debug_mode = false, cid_max = 1073741824,
  compress_threshold = 1024, serialiser = "msgpack", max_body = 64 * 1024 * 1024,
  heartbeat = 60, connect_timeout = 10, call_timeout = 30,
  queue_auto_delete = false, queue_expires = 60,
  log_format = "text", access_log = false,
  -- rabihost serve: "HOST:PORT" of /metrics, /healthz and /readyz (false:
  -- none), and how often each worker asks the broker about its queues.
  metrics = false, metrics_interval = 5,
  -- The watchdog's (host/watchdog.h): seconds a call may hold its worker's
  -- loop, deaths a request may cause before it is refused, MiB of Lua heap
  -- before a worker is replaced; 0 turns one off.
  stall_limit = 10, delivery_limit = 2, heap_limit = 1024,
  -- "classic" or "quorum" (replicated on a cluster).
  queue_type = "classic",
}

-- The HTTP gateway's settings, the config's http section (README, "HTTP
-- gateway"): sizes in bytes, times in seconds.
local HTTP_DEFAULTS = {
  listen = false,          -- "HOST:PORT": serve the gateway (beside serve's functions)
  max_body = 1024 * 1024,  -- a request body over this: 413
  max_inflight = 1024,     -- requests being answered at once per worker; beyond: 503
  max_connections = 1024,  -- open connections per worker (libmicrohttpd refuses more)
  header_limit = 32 * 1024, -- memory per connection for the request line and headers: beyond, 431
  client_timeout = 10,     -- a connection idle or slow this long is closed
  timeout = 30,            -- a call's timeout without X-Request-Timeout
  max_timeout = 60,        -- the most X-Request-Timeout may ask
  token = false,           -- a bearer token every request must carry (RABIHOST_HTTP_TOKEN too)
  tls_cert = false, tls_key = false, -- PEM files: HTTPS
  list_wait = 0.3,         -- GET /rpc: seconds to gather the hosts' answers
}
M.HTTP_DEFAULTS = HTTP_DEFAULTS

-- Every section and key a config file may hold.
local SECTIONS = {
  rabbitmq = { url = true, host = true, port = true, username = true, password = true, vhost = true,
               tls = true, ssl = true },
  app = {},
  secret = { secret = true },
  tls = { ca_cert = true, cert = true, key = true, verify_peer = true, verify_hostname = true },
  http = {},
}
for k in pairs(HTTP_DEFAULTS) do SECTIONS.http[k] = true end
for k in pairs(APP_DEFAULTS) do SECTIONS.app[k] = true end

-- What rabi.client{...} takes: the app settings (a client reads those of
-- them that concern it), and its own keys, each with the type it needs.
M.client_options = { url = "string or table", config = "string", tls = "table", serialiser = "string",
                     timeout = "number", connection_name = "string" }
for k, dflt in pairs(APP_DEFAULTS) do
  if M.client_options[k] == nil then M.client_options[k] = type(dflt) == "number" and "number" or "any" end
end

-- RabiBridge's log levels (loguru's) as the host's four.
local LEVEL_ALIASES = { TRACE = "DEBUG", SUCCESS = "INFO", WARNING = "WARN", CRITICAL = "ERROR" }

-- Flags the command line set for this process; rabi.client() inside a
-- service or a script run by rabihost uses them too.
M.process_options = {}

local function percent_encode(s)
  return (tostring(s):gsub("[^%w%-%._~]", function(c) return ("%%%02X"):format(c:byte()) end))
end
M.percent_encode = percent_encode

local function file_exists(path)
  local f = io.open(path, "r")
  if f then f:close() return true end
  return false
end

-- A config is read more than once in a process (the command line, then each
-- rabi.client()); each warning is given once.
local warned = {}
local function warn(fmt, ...)
  local msg = fmt:format(...)
  if warned[msg] then return end
  warned[msg] = true
  core.log("WARN", msg)
end

local function load_lua(path)
  local chunk, err = loadfile(path)
  if not chunk then return nil, ("cannot read config file: %s"):format(err) end
  local env = setmetatable({}, { __index = { os = { getenv = os.getenv }, tostring = tostring,
                                             tonumber = tonumber } })
  setfenv(chunk, env)
  local ok, ret = pcall(chunk)
  if not ok then return nil, ("invalid config file: %s"):format(tostring(ret)) end
  return type(ret) == "table" and ret or env
end

local function load_toml(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, ("cannot read config file: %s"):format(err) end
  local text = f:read("*a")
  f:close()
  local cfg, perr = core.toml_decode(text, path)
  if not cfg then return nil, ("invalid config file: %s"):format(perr) end
  return cfg
end

-- The canonical name of a key as written in a section.
local function canonical_key(section, key)
  local k = key:lower()
  if section == "rabbitmq" then k = k:gsub("^rabbitmq_", "") end
  return k
end

-- A suggestion in the style of the key that was written: RABBITMQ_HOST for
-- RABBITMQ_HOTS, host for hots.
local function suggestion(section, key, known)
  local bare = section == "rabbitmq" and key:gsub("^[Rr][Aa][Bb][Bb][Ii][Tt][Mm][Qq]_", "") or key
  local name = suggest.closest(bare, known)
  if not name then return "" end
  if key == key:upper() then
    name = name:upper()
    if section == "rabbitmq" and bare ~= key then name = "RABBITMQ_" .. name end
  end
  return (" (did you mean '%s'?)"):format(name)
end

-- One section's keys by their canonical names; unknown keys are warned of
-- and dropped.
local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end

local function normalize_section(section, t, path)
  local known, out, from = SECTIONS[section], {}, {}
  for _, key in ipairs(sorted_keys(t)) do
    local name = type(key) == "string" and canonical_key(section, key)
    if not name or not known[name] then
      warn("config: unknown key '%s.%s'%s in %s", section, tostring(key),
        type(key) == "string" and suggestion(section, key, known) or "", path)
    elseif from[name] then
      -- two spellings of one setting: the canonical one wins
      local other = from[name]
      if key == name then out[name], from[name] = t[key], key end
      warn("config: '%s.%s' and '%s.%s' are the same setting in %s; using '%s.%s'", section, other,
        section, key, path, section, from[name])
    else
      out[name], from[name] = t[key], key
    end
  end
  return out
end

-- Sections by their canonical names, each a table of known keys.
local function normalize(cfg, path)
  local out = {}
  for _, section in ipairs(sorted_keys(cfg)) do
    local t = cfg[section]
    local name = type(section) == "string" and section:lower()
    if not name or not SECTIONS[name] then
      warn("config: unknown section '%s'%s in %s", tostring(section),
        type(section) == "string" and suggest.hint(section, SECTIONS) or "", path)
    elseif type(t) ~= "table" then
      return nil, ("invalid config file %s: '%s' must be a table"):format(path, tostring(section))
    else
      out[name] = normalize_section(name, t, path)
    end
  end
  return out
end

-- Loads a config file: TOML when its name ends in .toml, else Lua assigning
-- the sections rabbitmq, app, secret, tls (or returning a table with them).
-- Unknown sections and keys are warned of, with the nearest known name.
-- -> table | nil, message
function M.load_file(path)
  local cfg, err
  if path:lower():match("%.toml$") then cfg, err = load_toml(path) else cfg, err = load_lua(path) end
  if not cfg then return nil, err end
  return normalize(cfg, path)
end

function M.find_file(opts)
  if opts.config then return opts.config, "--config" end
  local env = os.getenv("RABIBRIDGE_CONFIG")
  if env and env ~= "" then return env, "RABIBRIDGE_CONFIG" end
  if file_exists("config/rabibridge.lua") then return "config/rabibridge.lua", "./config/rabibridge.lua" end
  -- Where RabiBridge itself looks, so that a RabiBridge project works as it is.
  if file_exists("config/env.toml") then return "config/env.toml", "./config/env.toml" end
  return nil
end

-- RabiBridge ciphertext: base64 of whole AES blocks.
function M.looks_encrypted(password)
  return #password >= 24 and #password % 4 == 0 and password:match("^[%w+/]+=?=?$") ~= nil
end

local function getenv(name)
  local v = os.getenv(name)
  if v == "" then return nil end
  return v
end

-- The broker password from where it was found: decrypted when a secret is
-- known (as RabiBridge does), refused when it looks encrypted and none is.
-- -> password | nil, message
local function broker_password(password, secret, where)
  if secret then
    local plain, err = core.decrypt_password(password, secret)
    if not plain then return nil, ("%s: %s"):format(where, err) end
    return plain
  end
  if M.looks_encrypted(password) then
    return nil, ("%s looks encrypted but no secret is set (set SECRET in the environment or"
      .. " [secret] SECRET in the config)"):format(where)
  end
  return password
end

-- The broker URL from RABBITMQ_* in the environment and the config's
-- [rabbitmq], field by field, the environment first.
-- -> url, source | nil (no host in either) | nil, message
local function parts_url(cfg, secret)
  local r = cfg.rabbitmq or {}
  local used = {}
  local function pick(field, env_name)
    local v = getenv(env_name)
    if v then used[#used + 1] = env_name return v, env_name end
    if r[field] ~= nil then return tostring(r[field]), "the config's rabbitmq." .. field end
  end
  local host = pick("host", "RABBITMQ_HOST")
  if not host then return nil end
  local user = pick("username", "RABBITMQ_USERNAME") or "guest"
  local password, where = pick("password", "RABBITMQ_PASSWORD")
  if password then
    local err
    password, err = broker_password(password, secret, where)
    if not password then return nil, err end
  end
  local scheme = (r.tls or r.ssl or cfg.tls) and "amqps" or "amqp"
  local port = tonumber((pick("port", "RABBITMQ_PORT"))) or (scheme == "amqps" and 5671 or 5672)
  local vhost = pick("vhost", "RABBITMQ_VHOST")
  local url = ("%s://%s:%s@%s:%d/%s"):format(scheme, percent_encode(user), percent_encode(password or "guest"),
    host, port, vhost and percent_encode(vhost) or "")
  if #used == 0 then return url, "config file" end
  return url, (cfg.rabbitmq and "config file + " or "") .. table.concat(used, "/")
end

local function level_name(v)
  local lvl = tostring(v):upper()
  return LEVEL_ALIASES[lvl] or lvl
end

-- A broker URL, or a list of them (a cluster's nodes), as the C side takes
-- it: one string, the URLs separated by spaces. -> string | nil, message
local function url_list(v, where)
  if type(v) == "string" then return v end
  if type(v) ~= "table" then
    return nil, ("%s: expected a URL string or a list of them, got %s"):format(where, type(v))
  end
  if #v == 0 then return nil, ("%s: an empty list of URLs"):format(where) end
  for i, u in ipairs(v) do
    if type(u) ~= "string" or u == "" or u:find("%s") then
      return nil, ("%s: item %d is not a URL string (a non-empty string without spaces)"):format(where, i)
    end
  end
  return table.concat(v, " ")
end

-- The app settings RabbitMQ's queue declarations take, checked here so
-- that a bad one stops the start with its name. -> nil | message
local function queue_settings_error(s, sources)
  if s.queue_type ~= "classic" and s.queue_type ~= "quorum" then
    return ("app.queue_type (%s): expected \"classic\" or \"quorum\", got %s"):format(sources.queue_type,
      tostring(s.queue_type))
  end
  local n = s.delivery_limit
  if type(n) ~= "number" or n < 0 or n % 1 ~= 0 or n > 1000000 then
    return ("app.delivery_limit (%s): expected a whole number from 0 to 1000000, got %s"):format(
      sources.delivery_limit, tostring(n))
  end
end

-- -> settings table (with .sources) ; raises a connection error value on a
-- config that cannot be used.
function M.resolve(opts)
  opts = opts or {}
  local errors = require "rabibridge.errors"
  local function assert_url(u, err)
    if not u then errors.raise("invalid_argument", err) end
    return u
  end
  local merged = {}
  for k, v in pairs(M.process_options) do merged[k] = v end
  for k, v in pairs(opts) do merged[k] = v end
  local s, sources = {}, {}
  local cfg = {}
  local path, found_by = M.find_file(merged)
  if path then
    local loaded, err = M.load_file(path)
    if not loaded then errors.raise("invalid_argument", err) end
    cfg = loaded
    s.config_file, sources.config_file = path, found_by
  end
  local app = cfg.app or {}
  for k, dflt in pairs(APP_DEFAULTS) do
    if merged[k] ~= nil then s[k], sources[k] = merged[k], "option"
    elseif app[k] ~= nil then s[k], sources[k] = app[k], "config file"
    else s[k], sources[k] = dflt, "default" end
  end
  local qerr = queue_settings_error(s, sources)
  if qerr then errors.raise("invalid_argument", qerr) end
  s.log_level = level_name(s.log_level)
  if type(s.serialiser) == "string" then s.serialiser = s.serialiser:lower() end
  local secret = getenv("SECRET") or (cfg.secret and cfg.secret.secret)
  local url, src = merged.url, "option"
  if url ~= nil then url = assert_url(url_list(url, "url")) end
  if not url then url, src = getenv("RABIBRIDGE_URL"), "RABIBRIDGE_URL" end
  local file_url = cfg.rabbitmq and cfg.rabbitmq.url
  if not url and file_url and not getenv("RABBITMQ_HOST") then
    -- url may be a list: a cluster's nodes, tried in turn.
    url = assert_url(url_list(file_url, "rabbitmq.url in " .. path))
    src = "config file"
  end
  if not url then
    url, src = parts_url(cfg, secret)
    if not url and src then errors.raise("invalid_argument", src) end
  end
  if not url then url, src = DEFAULT_URL, "default" end
  s.url, sources.url = url, src
  s.connection_name = merged.connection_name
  -- TLS settings for amqps:// (ca_cert, cert, key, verify_peer, verify_hostname).
  if merged.tls ~= nil then s.tls, sources.tls = merged.tls, "option"
  elseif cfg.tls ~= nil then s.tls, sources.tls = cfg.tls, "config file" end
  local herr
  s.http, sources.http, herr = M.http_settings(cfg.http or {}, merged.http or {})
  if not s.http then errors.raise("invalid_argument", herr) end
  s.sources = sources
  return s
end

local function positive(v) return type(v) == "number" and v > 0 and v < math.huge end
local HTTP_CHECKS = {
  listen = function(v) return v == false or (type(v) == "string" and v:match("^.+:%d+$") ~= nil), "HOST:PORT" end,
  token = function(v) return v == false or (type(v) == "string" and v ~= "" and not v:find("%s")),
    "a string without spaces" end,
  tls_cert = function(v) return v == false or type(v) == "string", "a file name" end,
  tls_key = function(v) return v == false or type(v) == "string", "a file name" end,
  header_limit = function(v) return positive(v) and v >= 4096, "a number of bytes >= 4096" end,
  client_timeout = function(v) return type(v) == "number" and v >= 0 and v % 1 == 0, "whole seconds >= 0" end,
  list_wait = function(v) return type(v) == "number" and v >= 0 and v < 60, "seconds from 0 to 60" end,
}

-- The http section: the options' (command line), the config's, the
-- defaults; the token may come from RABIHOST_HTTP_TOKEN. Each checked.
-- -> settings, source | nil, nil, message
function M.http_settings(file, options)
  local h, src = {}, "default"
  for k, dflt in pairs(HTTP_DEFAULTS) do
    local v = dflt
    if options[k] ~= nil then v, src = options[k], "option"
    elseif file[k] ~= nil then v, src = file[k], "config file" end
    h[k] = v
  end
  if not h.token and getenv("RABIHOST_HTTP_TOKEN") then h.token = getenv("RABIHOST_HTTP_TOKEN") end
  for k in pairs(HTTP_DEFAULTS) do
    local check = HTTP_CHECKS[k] or function(v) return positive(v), "a number > 0" end
    local ok, what = check(h[k])
    if not ok then
      -- never the token's value in a message
      return nil, nil, ("http.%s must be %s, got %s"):format(k, what, k == "token" and type(h[k]) or tostring(h[k]))
    end
  end
  if h.timeout > h.max_timeout then
    return nil, nil, ("http.timeout (%g) must not be over http.max_timeout (%g)"):format(h.timeout, h.max_timeout)
  end
  for _, k in ipairs { "max_body", "max_inflight", "max_connections", "header_limit" } do h[k] = math.floor(h[k]) end
  for k, v in pairs(h) do if v == false then h[k] = nil end end
  return h, src
end

-- The URL (or URL list) with whatever could be a password masked, however
-- malformed: the one rule the C side uses for its messages too.
M.mask_url = core.mask_url

return M

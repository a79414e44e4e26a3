-- Connection and app settings, from first to last: explicit options
-- (command-line flags), the environment, the config file, then RabbitMQ's
-- own default URL. Every resolved value remembers where it came from.
local M = {}

local DEFAULT_URL = "amqp://guest:guest@localhost:5672/"

local APP_DEFAULTS = {
  log_level = "INFO", debug_mode = false, cid_max = 1073741824,
  compress_threshold = 1024, serialiser = "msgpack", max_body = 64 * 1024 * 1024,
  heartbeat = 60, connect_timeout = 10, queue_auto_delete = true,
}

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

-- Loads a config file: Lua assigning the sections rabbitmq, app, secret (or
-- returning a table with them). -> table | nil, message
function M.load_file(path)
  local chunk, err = loadfile(path)
  if not chunk then return nil, ("cannot read config file: %s"):format(err) end
  local env = setmetatable({}, { __index = { os = { getenv = os.getenv }, tostring = tostring,
                                             tonumber = tonumber } })
  setfenv(chunk, env)
  local ok, ret = pcall(chunk)
  if not ok then return nil, ("invalid config file: %s"):format(tostring(ret)) end
  local cfg = type(ret) == "table" and ret or env
  for _, section in ipairs { "rabbitmq", "app", "secret", "tls" } do
    local v = rawget(cfg, section)
    if v ~= nil and type(v) ~= "table" then
      return nil, ("invalid config file %s: '%s' must be a table"):format(path, section)
    end
  end
  return cfg
end

function M.find_file(opts)
  if opts.config then return opts.config, "--config" end
  local env = os.getenv("RABIBRIDGE_CONFIG")
  if env and env ~= "" then return env, "RABIBRIDGE_CONFIG" end
  if file_exists("config/rabibridge.lua") then return "config/rabibridge.lua", "./config/rabibridge.lua" end
  return nil
end

-- RabiBridge ciphertext: base64 of whole AES blocks.
function M.looks_encrypted(password)
  return #password >= 24 and #password % 4 == 0 and password:match("^[%w+/]+=?=?$") ~= nil
end

local function env_url()
  local url = os.getenv("RABIBRIDGE_URL")
  if url and url ~= "" then return url, "RABIBRIDGE_URL" end
  local host = os.getenv("RABBITMQ_HOST")
  if not host or host == "" then return nil end
  local user = os.getenv("RABBITMQ_USERNAME") or "guest"
  local pass = os.getenv("RABBITMQ_PASSWORD") or "guest"
  local port = os.getenv("RABBITMQ_PORT") or "5672"
  return ("amqp://%s:%s@%s:%s/"):format(percent_encode(user), percent_encode(pass), host, port),
    "RABBITMQ_HOST/PORT/USERNAME/PASSWORD"
end

local function file_url(cfg, secret)
  local r = cfg.rabbitmq
  if not r then return nil end
  -- url may be a list: a cluster's nodes, tried in turn.
  if type(r.url) == "table" then return table.concat(r.url, " ") end
  if r.url then return r.url end
  if not r.host then return nil end
  local password = r.password or "guest"
  if secret and r.password then
    local plain, err = require("rabibridge.core").decrypt_password(r.password, secret)
    if not plain then return nil, err end
    password = plain
  elseif M.looks_encrypted(password) then
    return nil, "the config's rabbitmq.password looks encrypted but no secret is set"
      .. " (set SECRET in the environment or secret = { secret = ... } in the config)"
  end
  local scheme = (r.tls or r.ssl or cfg.tls) and "amqps" or "amqp"
  return ("%s://%s:%s@%s:%d/%s"):format(scheme, percent_encode(r.username or "guest"),
    percent_encode(password), r.host, tonumber(r.port) or (scheme == "amqps" and 5671 or 5672),
    r.vhost and percent_encode(r.vhost) or "")
end

-- -> settings table (with .sources) ; raises a connection error value on a
-- config that cannot be used.
function M.resolve(opts)
  opts = opts or {}
  local merged = {}
  for k, v in pairs(M.process_options) do merged[k] = v end
  for k, v in pairs(opts) do merged[k] = v end
  local s, sources = {}, {}
  local cfg = {}
  local path, found_by = M.find_file(merged)
  if path then
    local loaded, err = M.load_file(path)
    if not loaded then
      require("rabibridge.errors").raise("invalid_argument", err)
    end
    cfg = loaded
    s.config_file, sources.config_file = path, found_by
  end
  local app = cfg.app or {}
  for k, dflt in pairs(APP_DEFAULTS) do
    if merged[k] ~= nil then s[k], sources[k] = merged[k], "option"
    elseif app[k] ~= nil then s[k], sources[k] = app[k], "config file"
    else s[k], sources[k] = dflt, "default" end
  end
  local secret = os.getenv("SECRET")
  if secret == "" then secret = nil end
  if not secret and cfg.secret then secret = cfg.secret.secret end
  local url, src = merged.url, "option"
  if not url then url, src = env_url() end
  if not url then
    local err
    url, err = file_url(cfg, secret)
    if err then require("rabibridge.errors").raise("invalid_argument", err) end
    src = "config file"
  end
  if not url then url, src = DEFAULT_URL, "default" end
  s.url, sources.url = url, src
  s.connection_name = merged.connection_name
  -- TLS settings for amqps:// (ca_cert, cert, key, verify_peer, verify_hostname).
  if merged.tls ~= nil then s.tls, sources.tls = merged.tls, "option"
  elseif cfg.tls ~= nil then s.tls, sources.tls = cfg.tls, "config file" end
  s.sources = sources
  return s
end

function M.mask_url(url)
  return (url:gsub("(%a+://[^:/@ ]*:)[^@ ]*@", "%1****@"))
end

return M

-- What the command line says about itself. `rabihost --help`, every
-- command's --help, the option parser (lua/rabibridge/cli.lua) and the man
-- page rabihost(1) (doc/mkman.lua) are all made from this one table, so none
-- of them can document an option the others do not know.
--
-- An option: long name, short alias, argument name (none: a flag), "list"
-- when it may be given again, and one line of text. Texts are plain: no
-- markup, so that each renderer escapes them its own way.
local M = {}

M.name = "rabihost"
M.summary = "serve Lua functions as RPC over RabbitMQ, wire-compatible with RabiBridge"

M.description = {
  "rabihost runs Lua service scripts that register functions with rabi.register_call; "
    .. "each function becomes a RabbitMQ queue, and callers reach it by name through the broker. "
    .. "It also calls functions from the shell, runs Lua client scripts and offers a REPL.",
  "Every command takes --url, -c/--config, --log-level, --log-format, --serialiser and --help. "
    .. "Without a command, rabihost serves: rabihost DIR is rabihost serve DIR.",
}

-- The options every command takes.
M.common = {
  { long = "url", arg = "URL", list = true,
    text = "broker URL, amqp://user:password@host:port/vhost or amqps://; give it again for more brokers "
      .. "(a cluster's nodes), tried in turn" },
  { long = "config", short = "c", arg = "FILE", text = "config file (default $RABIBRIDGE_CONFIG, then ./config/rabibridge.lua, then ./config/env.toml); a .toml file may be RabiBridge's env.toml as it is" },
  { long = "log-level", arg = "LEVEL", text = "DEBUG, INFO, WARN or ERROR" },
  { long = "log-format", arg = "FORMAT", text = "text (the default) or json: one JSON object per line, "
      .. "for log shippers" },
  { long = "serialiser", arg = "NAME", text = "what a client sends: msgpack (the default, as RabiBridge's) or json; a server answers each call in the serialiser it came in" },
  { long = "help", short = "h", text = "print this command's help and exit" },
}

M.commands = {
  {
    name = "serve", args = "[OPTIONS] [DIR|FILE...]",
    summary = "serve every *.lua under DIR (default ./services)",
    text = "Loads the service scripts and serves the functions they register until SIGTERM or SIGINT, "
      .. "then drains: calls in flight finish, their replies are published. SIGHUP reloads the scripts. "
      .. "serve is the default command.",
    options = {
      { long = "workers", short = "w", arg = "N", text = "worker processes (default 1; 0 = one per logical core)" },
      { long = "bind-core", text = "pin worker i to core i" },
      { long = "reload", text = "on a change under DIR, start workers with the new code, then drain the old" },
      { long = "drain-timeout", arg = "S", text = "on SIGTERM, wait at most S seconds for calls in flight, then kill the worker (default 30)" },
      { long = "access-log", text = "log one line per call served: function, outcome, duration, trace id "
          .. "(whatever the log level)" },
      { long = "keep-going", text = "serve the scripts that load when others fail to (default: stop with "
          .. "status 65)" },
      { long = "metrics", arg = "HOST:PORT", text = "serve Prometheus metrics (/metrics), /healthz and /readyz over HTTP there (app.metrics in the config)" },
      { long = "stall-limit", arg = "S", text = "a call that holds its worker's loop S seconds without yielding gets "
          .. "the worker replaced and its caller an error (default 10, app.stall_limit; 0: off)" },
      { long = "delivery-limit", arg = "N", text = "a request whose handler killed or stalled its worker N times is "
          .. "answered with an error instead of run again (default 2, app.delivery_limit; 0: no limit)" },
      { long = "heap-limit", arg = "MIB", text = "a worker whose Lua heap passes MIB MiB finishes its calls and is "
          .. "replaced (default 1024, app.heap_limit; 0: no limit)" },
      { long = "http", arg = "HOST:PORT", text = "each worker also serves the HTTP gateway there: POST /rpc/NAME "
          .. "calls NAME, GET /rpc lists the functions, and the scripts' rabi.http.route routes (http.listen "
          .. "in the config)" },
      { long = "tls-cert", arg = "FILE", text = "the gateway speaks HTTPS with this PEM certificate (http.tls_cert)" },
      { long = "tls-key", arg = "FILE", text = "the PEM private key of --tls-cert (http.tls_key)" },
    },
    exits = { { 0 }, { 1, "a worker failed with an error before serving" }, { 2 }, { 3 }, { 64 },
              { 65, "a service script failed to load at start (without --keep-going)" }, { 66 },
              { 78, "configuration, or --metrics or --http cannot listen on HOST:PORT" } },
  },
  {
    name = "gateway", args = "--listen HOST:PORT [OPTIONS] [DIR|FILE...]",
    summary = "serve the HTTP gateway only: POST /rpc/NAME calls NAME over the broker",
    text = "Each worker answers HTTP on HOST:PORT from its own event loop, every request a task making its "
      .. "call: POST /rpc/NAME with a JSON body {\"args\": [...], \"kwargs\": {...}} (or a bare array of "
      .. "arguments) answers the result as JSON; GET /rpc lists the functions served. Errors are JSON "
      .. "{\"kind\", \"message\"}: 404 no_route, 503 queue_full or connection, 504 timeout, 502 remote, 400 "
      .. "bad arguments, 413 body too large. The header X-Request-Timeout: S sets a call's timeout (at most "
      .. "http.max_timeout). Scripts given add their rabi.http.route routes; the functions they register are "
      .. "not served. Limits, the bearer token (http.token, $RABIHOST_HTTP_TOKEN) and TLS are set in the "
      .. "config's http section.",
    options = {
      { long = "listen", arg = "HOST:PORT", text = "where to answer HTTP (http.listen in the config)" },
      { long = "workers", short = "w", arg = "N", text = "worker processes (default 1; 0 = one per logical core), "
          .. "all accepting on the one socket" },
      { long = "drain-timeout", arg = "S", text = "on SIGTERM, wait at most S seconds for requests in flight "
          .. "(default 30)" },
      { long = "tls-cert", arg = "FILE", text = "speak HTTPS with this PEM certificate (http.tls_cert)" },
      { long = "tls-key", arg = "FILE", text = "the PEM private key of --tls-cert (http.tls_key)" },
    },
    exits = { { 0 }, { 2 }, { 64 }, { 66 }, { 78, "configuration, or HOST:PORT cannot be listened on" } },
  },
  {
    name = "call", args = "[OPTIONS] NAME [ARG...]",
    summary = "call the remote function NAME and print its result as JSON",
    text = "Each ARG is a JSON value; a word that is not JSON is a string. On failure prints one line, "
      .. "error: KIND: message, on stderr.",
    options = {
      { long = "kwargs", arg = "JSON", text = "keyword arguments, a JSON object" },
      { long = "ftype", arg = "TYPE", text = "async (the default) or sync" },
      { long = "timeout", arg = "S", text = "give up after S seconds (default 30)" },
      { long = "traceback", text = "after a remote error, print the remote traceback too" },
    },
    exits = { { 0, "the result was printed" },
              { 1, "the call failed: a remote error, a timeout, no such function, a full queue..." },
              { 64 }, { 69 }, { 78 } },
  },
  {
    name = "run", args = "[OPTIONS] FILE.lua [ARG...]",
    summary = "run a Lua client script with rabibridge loaded",
    text = "The script gets its ARGs in arg and as ...; options after FILE.lua are the script's. "
      .. "rabi.client() in the script uses --url and --config. A script that registers functions "
      .. "is a service: serve it with rabihost serve FILE.lua.",
    options = {},
    exits = { { 0 }, { 1, "the script raised an error" },
              { 64, "usage, or FILE.lua is a service (it registers functions)" }, { 66 }, { 78 } },
  },
  {
    name = "repl", args = "[OPTIONS]",
    summary = "interactive LuaJIT with rabi and a connected client",
    text = "Each line is evaluated and its values printed (strings quoted, tables as JSON); "
      .. "client.fn.NAME(...) calls NAME. Tab completes names, fields, methods and the functions "
      .. "served (client.fn.<Tab>). Ctrl-C cancels the call in progress or the line being typed; "
      .. "Ctrl-D ends. The history is kept in $RABIBRIDGE_HISTORY (empty or off: not kept), else "
      .. "$XDG_STATE_HOME/rabibridge/history, else ~/.local/state/rabibridge/history, "
      .. "at most $RABIBRIDGE_HISTORY_SIZE lines (1000).",
    options = {},
    exits = { { 0 }, { 64 }, { 78 } },
  },
  {
    name = "list", args = "[OPTIONS] [NAME...]",
    summary = "list the functions served on the broker",
    text = "Every rabihost worker on the broker describes what it serves: each function's name, ftype "
      .. "and params, and its queue's arguments; the broker adds its consumers (all hosts, Python "
      .. "peers included) and the calls waiting. Python RabiBridge servers do not answer, so a "
      .. "function only they serve is not listed unless named: with NAMEs only those are listed, "
      .. "and their queues are looked up on the broker (params ? when no rabihost describes them). "
      .. "A name marked (!) is described differently by different workers.",
    options = {
      { long = "wait", arg = "S", text = "gather the hosts' answers for S seconds (default 0.5)" },
      { long = "json", text = "print the list as JSON, for scripts: {\"functions\": [...], \"answered\": N}" },
    },
    exits = { { 0, "the list was printed (even an empty one)" },
              { 1, "a NAME given is not served: the broker has no queue for it" },
              { 64 }, { 69 }, { 78 } },
  },
  {
    name = "encrypt-password", args = "[OPTIONS] PASSWORD|-",
    summary = "print PASSWORD encrypted for the config file",
    text = "The ciphertext is RabiBridge's (AES-256-CBC of the base64 of the password, as its runtime "
      .. "reads it), for rabbitmq.password in the config file or $RABBITMQ_PASSWORD. With - the password "
      .. "is read from standard input, so that it stays out of the process list. "
      .. "The secret comes from --secret, then $SECRET, then the config's secret section.",
    options = {
      { long = "secret", arg = "S", text = "the secret to encrypt with" },
    },
    exits = { { 0 }, { 64 } },
  },
  {
    name = "show-config", args = "[OPTIONS]",
    summary = "print the effective settings and where each comes from",
    text = "Passwords are masked.",
    options = {},
    exits = { { 0 }, { 64 }, { 78 } },
  },
}

M.exit_codes = {
  { 0, "success" },
  { 1, "the call failed (call), the script raised (run), a worker failed with an error before serving (serve), "
    .. "or a function named is not served (list)" },
  { 2, "a worker could not connect to the broker at start" },
  { 3, "an on_start hook raised" },
  { 64, "usage: an unknown command or option, a missing or malformed argument, or run given a service" },
  { 65, "a service script failed to load: at start, unless --keep-going (during a reload it is a worker's "
    .. "status, in the log, and the running code keeps serving)" },
  { 66, "a service folder or script cannot be read" },
  { 69, "the broker cannot be reached" },
  { 70, "internal error" },
  { 78, "configuration: a config file that does not load, a bad setting or a password that does not decrypt" },
}

M.environment = {
  { "RABIBRIDGE_URL", "broker URL when --url is not given" },
  { "RABBITMQ_HOST, RABBITMQ_PORT, RABBITMQ_USERNAME, RABBITMQ_PASSWORD",
    "the broker, when neither --url nor RABIBRIDGE_URL is given" },
  { "SECRET", "the secret that decrypts the config's rabbitmq.password and $RABBITMQ_PASSWORD" },
  { "RABIBRIDGE_CONFIG", "config file when -c is not given" },
  { "RABIHOST_HTTP_TOKEN", "the bearer token the HTTP gateway requires, when the config's http.token is not set" },
}

M.files = {
  { "./config/rabibridge.lua", "config file, when neither -c nor RABIBRIDGE_CONFIG is given: Lua assigning "
    .. "the sections rabbitmq, app, secret and tls" },
  { "./config/env.toml", "config file after ./config/rabibridge.lua: RabiBridge's TOML file, as it is" },
  { "./services/", "the service scripts rabihost serves when given no DIR" },
}

M.examples = {
  { "rabihost serve -w 0 services/", "serve services/ with one worker per core" },
  { "rabihost call add 2 3", "call add(2, 3) and print 5" },
  { "rabihost call greet --kwargs '{\"name\": \"Ada\"}'", "call with keyword arguments" },
  { "rabihost list --json", "the functions served on the broker, as JSON" },
  { "rabihost gateway --listen 127.0.0.1:8080 -w 2", "answer POST /rpc/NAME over HTTP with two workers" },
  { "rabihost run --url amqp://guest:guest@localhost:5672/ examples/hello.lua", "run a client script" },
}

-- ---- plain text, for --help ----

local WIDTH = 79

-- Words of text filled to width, each line after the first indented.
local function fill(text, width, indent)
  local lines, line = {}, ""
  for word in text:gmatch("%S+") do
    if line ~= "" and #line + 1 + #word > width then
      lines[#lines + 1] = line
      line = word
    else
      line = line == "" and word or line .. " " .. word
    end
  end
  lines[#lines + 1] = line
  return table.concat(lines, "\n" .. indent)
end

-- A two-column list: label, then its text filled beside it (or below it
-- when the label is too long).
local function columns(out, rows, indent, col)
  local pad = indent .. (" "):rep(col)
  for _, r in ipairs(rows) do
    local label, text = r[1], r[2]
    if #label + 2 > col then
      out[#out + 1] = indent .. label
      out[#out + 1] = pad .. fill(text, WIDTH - #pad, pad)
    else
      out[#out + 1] = indent .. label .. (" "):rep(col - #label) .. fill(text, WIDTH - #pad, pad)
    end
  end
end

local function option_rows(options)
  local rows = {}
  for _, o in ipairs(options) do rows[#rows + 1] = { M.option_label(o), o.text } end
  return rows
end

-- exits: { {code [, text]}, ... }; a code without its own text has the
-- general one.
local function exit_rows(exits)
  local rows = {}
  for _, e in ipairs(exits) do rows[#rows + 1] = { tostring(e[1]), e[2] or M.exit_text(e[1]) } end
  return rows
end

-- `rabihost --help`: every command with its options, then what they share.
function M.usage()
  local out = { "usage:" }
  for _, c in ipairs(M.commands) do
    out[#out + 1] = ("  %s %s %s"):format(M.name, c.name, c.args)
    out[#out + 1] = "      " .. fill(c.summary, WIDTH - 6, "      ")
    columns(out, option_rows(c.options), "      ", 24)
  end
  out[#out + 1] = ("  %s --help | --version"):format(M.name)
  out[#out + 1] = ""
  out[#out + 1] = "Without a command, rabihost serves: rabihost DIR is rabihost serve DIR."
  out[#out + 1] = "rabihost COMMAND --help says more about one command."
  out[#out + 1] = ""
  out[#out + 1] = "options of every command:"
  columns(out, option_rows(M.common), "  ", 24)
  out[#out + 1] = ""
  out[#out + 1] = "exit status:"
  columns(out, exit_rows(M.exit_codes), "  ", 6)
  out[#out + 1] = ""
  out[#out + 1] = "environment:"
  for _, e in ipairs(M.environment) do
    out[#out + 1] = "  " .. e[1]
    out[#out + 1] = "      " .. fill(e[2], WIDTH - 6, "      ")
  end
  return table.concat(out, "\n") .. "\n"
end

-- `rabihost NAME --help`.
function M.command_usage(name)
  local c = assert(M.command(name), name)
  local out = { ("usage: %s %s %s"):format(M.name, c.name, c.args), "",
                "  " .. fill(c.summary .. ". " .. c.text, WIDTH - 2, "  "), "" }
  if #c.options > 0 then
    out[#out + 1] = "options:"
    columns(out, option_rows(c.options), "  ", 24)
  end
  out[#out + 1] = #c.options > 0 and "and the options of every command:" or "options (those of every command):"
  columns(out, option_rows(M.common), "  ", 24)
  out[#out + 1] = ""
  out[#out + 1] = "exit status:"
  columns(out, exit_rows(c.exits), "  ", 6)
  return table.concat(out, "\n") .. "\n"
end

function M.command(name)
  for _, c in ipairs(M.commands) do
    if c.name == name then return c end
  end
  return nil
end

-- "-w, --workers N" for an option.
function M.option_label(o)
  local s = "--" .. o.long
  if o.short then s = "-" .. o.short .. ", " .. s end
  if o.arg then s = s .. " " .. o.arg end
  return s
end

function M.exit_text(code)
  for _, e in ipairs(M.exit_codes) do
    if e[1] == code then return e[2] end
  end
  return nil
end

return M

-- Writes the man page rabihost(1) in roff from the table that `rabihost
-- --help` prints (lua/rabibridge/help.lua), so the two say the same thing.
-- usage: luajit doc/mkman.lua VERSION > rabihost.1   (from the repository root)
package.path = "lua/?.lua;" .. package.path
local help = require "rabibridge.help"

local version = assert(arg[1], "usage: luajit doc/mkman.lua VERSION")
local out = {}

local function emit(s) out[#out + 1] = s end

-- Plain text as roff: backslashes and hyphens escaped, and a line never
-- starts with a control character.
local function esc(s)
  s = s:gsub("\\", "\\e"):gsub("%-", "\\-")
  return (s:gsub("^([%.'])", "\\&%1"))
end

-- "-w, --workers N": the option names bold, the argument italic.
local function option_label(o)
  local s = "\\fB\\-\\-" .. esc(o.long) .. "\\fR"
  if o.short then s = "\\fB\\-" .. esc(o.short) .. "\\fR, " .. s end
  if o.arg then s = s .. " \\fI" .. esc(o.arg) .. "\\fR" end
  return s
end

local function section(name) emit(".SH " .. name) end

local function item(label, text)
  emit(".TP")
  emit(label)
  emit(esc(text))
end

emit(('.TH RABIHOST 1 "" "rabihost %s" "User Commands"'):format(esc(version)))
section("NAME")
emit("rabihost \\- " .. esc(help.summary))

section("SYNOPSIS")
for i, c in ipairs(help.commands) do
  if i > 1 then emit(".br") end
  emit(("\\fBrabihost %s\\fR %s"):format(esc(c.name), esc(c.args)))
end
emit(".br")
emit("\\fBrabihost\\fR \\fB\\-\\-help\\fR | \\fB\\-\\-version\\fR")

section("DESCRIPTION")
for i, p in ipairs(help.description) do
  if i > 1 then emit(".PP") end
  emit(esc(p))
end

section("COMMANDS")
for _, c in ipairs(help.commands) do
  emit(".SS " .. esc(c.name .. " " .. c.args))
  emit(esc(c.summary .. ". " .. c.text))
  for _, o in ipairs(c.options) do item(option_label(o), o.text) end
  emit(".PP")
  local codes = {}
  for _, e in ipairs(c.exits) do codes[#codes + 1] = tostring(e[1]) end
  emit(esc("Exit status: " .. table.concat(codes, ", ") .. "."))
end

section("OPTIONS OF EVERY COMMAND")
for _, o in ipairs(help.common) do item(option_label(o), o.text) end

section("EXIT STATUS")
for _, e in ipairs(help.exit_codes) do item("\\fB" .. e[1] .. "\\fR", e[2]) end

section("ENVIRONMENT")
for _, e in ipairs(help.environment) do item("\\fB" .. esc(e[1]) .. "\\fR", e[2]) end

section("FILES")
for _, f in ipairs(help.files) do item("\\fI" .. esc(f[1]) .. "\\fR", f[2]) end

section("EXAMPLES")
for _, x in ipairs(help.examples) do
  emit(".PP")
  emit(esc(x[2]) .. ":")
  emit(".RS")
  emit(".nf")
  emit("\\f(CW" .. esc(x[1]) .. "\\fR")
  emit(".fi")
  emit(".RE")
end

section("SEE ALSO")
emit("\\fBluajit\\fR(1), \\fBrabbitmqctl\\fR(8)")

io.write(table.concat(out, "\n"), "\n")

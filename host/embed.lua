-- Writes a C file embedding the Lua modules given on the command line:
--   luajit host/embed.lua OUT.c lua/rabibridge/init.lua lua/rabibridge/cli.lua ...
-- lua/a/init.lua becomes module "a", lua/a/b.lua becomes "a.b".
local out_path = assert(arg[1], "usage: embed.lua OUT.c FILE.lua...")
local parts = { '#include <stddef.h>\n',
  'typedef struct { const char *name, *chunkname; const char *source; size_t len; } embedded_module;\n' }
local entries = {}
for i = 2, #arg do
  local path = arg[i]
  local f = assert(io.open(path, "rb"))
  local src = f:read("*a")
  f:close()
  local name = path:gsub("^lua/", ""):gsub("%.lua$", ""):gsub("/init$", ""):gsub("/", ".")
  local bytes = {}
  for j = 1, #src do bytes[#bytes + 1] = tostring(src:byte(j)) end
  parts[#parts + 1] = ("static const char src_%d[] = {%s,0};\n"):format(i, table.concat(bytes, ","))
  entries[#entries + 1] = ('  {"%s", "@%s", src_%d, %d},\n'):format(name, path, i, #src)
end
parts[#parts + 1] = "const embedded_module rb_embedded_modules[] = {\n"
parts[#parts + 1] = table.concat(entries)
parts[#parts + 1] = "  {NULL, NULL, NULL, 0}\n};\n"
local out = assert(io.open(out_path, "wb"))
out:write(table.concat(parts))
out:close()

-- Fails when a public name of the library is missing from the API reference
-- that ldoc wrote to build/doc: every field of require "rabibridge" and
-- every method of its Client. Names starting with _ are internal.
-- usage: luajit doc/check.lua   (from the repository root, after ldoc and make)
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/?.so;" .. package.cpath
local rabi = require "rabibridge"

local f = assert(io.open("build/doc/modules/rabibridge.html"))
local html = f:read("*a")
f:close()

local missing = {}
local function need(anchor)
  if not html:find('<a name = "' .. anchor .. '"', 1, true) then missing[#missing + 1] = anchor end
end
for k in pairs(rabi) do
  -- Client is the class, documented as its methods below.
  if type(k) == "string" and k:sub(1, 1) ~= "_" and k ~= "Client" then need(k) end
end
for k, v in pairs(rabi.Client) do
  if type(v) == "function" and k:sub(1, 1) ~= "_" then need("Client:" .. k) end
end
need("Client.fn")
table.sort(missing)
if #missing > 0 then
  io.stderr:write("not in the API reference (add a doc comment in lua/rabibridge/): ",
    table.concat(missing, ", "), "\n")
  os.exit(1)
end
print("API reference: every public name is documented")

-- scripts/deps.sh, which every make target uses to install its Debian
-- packages: a user who is neither root nor allowed to sudo gets the list of
-- the missing packages and a failure, and nothing is installed.
local H = require "helper"

local function is_root()
  return H.run("id -u").stdout:match("^0%s*$") ~= nil
end

describe("scripts/deps.sh", function()
  it("installs nothing and says nothing when every package is there", function()
    local res = H.run { "scripts/deps.sh", "make something", "coreutils", "bash" }
    assert.equal(0, res.code, res.stderr)
    assert.equal("", res.stdout .. res.stderr)
  end)

  it("names the missing packages to a user who cannot install them", function()
    if not is_root() then
      pending("needs root, to run the script as the user nobody")
      return
    end
    local missing = "rabihost-no-such-package" .. H.new_suffix():gsub("_", "-")
    local res = H.run { "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
      "scripts/deps.sh", "make something", "coreutils", missing }
    assert.equal(1, res.code, res.stderr)
    assert.matches("make something needs these Debian packages", res.stderr, 1, true)
    assert.matches("apt-get install " .. missing .. "\n", res.stderr, 1, true)
    assert.is_nil(res.stderr:find("coreutils", 1, true)) -- installed: not asked for
  end)
end)

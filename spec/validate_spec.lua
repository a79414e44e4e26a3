-- validate = true converts arguments as pydantic's lax mode does (what
-- RabiBridge's validate_call accepts), for what a Lua type can express,
-- and refuses the rest naming the value. No broker needed.
local service = require "rabibridge.service"
local rabi = require "rabibridge"

local coerce = service.coerce

local function refused(v, ptype)
  local got = coerce(v, ptype)
  assert.is_nil(got, ("%s accepted as %s"):format(tostring(v), ptype))
end

describe("validate", function()
  it("takes a number, a numeric string, an integer cdata or a boolean for a number", function()
    assert.equal(1.5, coerce(1.5, "number"))
    assert.equal(1.5, coerce("1.5", "number"))
    assert.equal(1000, coerce(" -1e3 ", "number") * -1)
    assert.equal(0.5, coerce(".5", "number"))
    assert.equal(math.huge, coerce("inf", "number"))
    assert.equal(-math.huge, coerce("-Infinity", "number"))
    local nan = coerce("nan", "number")
    assert.is_true(nan ~= nan)
    assert.equal(1, coerce(true, "number"))
    assert.equal(0, coerce(false, "number"))
    assert.is_true(coerce(9007199254740993LL, "number") == 9007199254740993LL)
    for _, bad in ipairs { "0x10", "1.5x", "", " ", "1e", "--1", "1_000" } do refused(bad, "number") end
    refused({}, "number")
  end)

  it("takes an integral number or an integer string for an integer, and no fraction", function()
    assert.equal(3, coerce(3.0, "integer"))
    assert.equal(12, coerce("12", "integer"))
    assert.equal(-12, coerce(" -12 ", "integer"))
    assert.equal(12, coerce("12.000", "integer"))
    assert.equal(1, coerce(true, "integer"))
    local big = coerce("12345678901234567890", "integer")
    assert.equal("12345678901234567890ULL", tostring(big))
    assert.equal("-9223372036854775808LL", tostring(coerce("-9223372036854775808", "integer")))
    assert.equal("9007199254740993LL", tostring(coerce("9007199254740993", "integer")))
    assert.equal(9007199254740992, coerce("9007199254740992", "integer"))
    for _, bad in ipairs { 1.5, 0 / 0, math.huge, "1.5", "1e3", "12a", "", "18446744073709551616",
                           "-9223372036854775809" } do
      refused(bad, "integer")
    end
  end)

  it("takes 0, 1 and pydantic's words for a boolean", function()
    assert.is_true(coerce(1, "boolean"))
    assert.is_false(coerce(0, "boolean"))
    for _, yes in ipairs { "1", "on", "t", "true", "y", "yes", "YES", "True" } do
      assert.is_true(coerce(yes, "boolean"), yes)
    end
    for _, no in ipairs { "0", "off", "f", "false", "n", "no", "No", "FALSE" } do
      assert.is_false(coerce(no, "boolean"), no)
    end
    for _, bad in ipairs { 2, 0.5, "maybe", "", " yes" } do refused(bad, "boolean") end
  end)

  it("converts nothing to a string or a table", function()
    assert.equal("x", coerce("x", "string"))
    refused(5, "string")
    refused(true, "string")
    local t = {}
    assert.equal(t, coerce(t, "table"))
    refused("{}", "table")
  end)

  it("hands the converted values to the handler and names a refused one", function()
    finally(function() service.reset() end)
    local spec = rabi.register_call("validate_unit", {
      validate = true, params = { "i:integer", "x:number", "b:boolean?" },
    }, function() end)
    local argv, n = service.bind(spec, rabi.array { "7", "2.5" }, { b = "yes" })
    assert.same({ 7, 2.5, true }, argv)
    assert.equal(3, n)
    local _, err = service.bind(spec, rabi.array { 1.5, 1 }, {})
    assert.equal("validate_unit: argument 'i' must be integer, got 1.5 (a number with a fraction)", err)
    _, err = service.bind(spec, rabi.array { "12a", 1 }, {})
    assert.equal([[validate_unit: argument 'i' must be integer, got string "12a"]], err)
    _, err = service.bind(spec, rabi.array { 1, 1, 2 }, {})
    assert.equal("validate_unit: argument 'b' must be boolean, got integer", err)
  end)
end)

-- host/loop.c's before-sleep hooks, driven through LuaJIT's FFI on the C
-- core the library loads (build/rabibridge/core.so): links flush their
-- acks and pending reads there, so a hook skipped for a round leaves them
-- unwritten until something else wakes the loop.
local ffi = require "ffi"

ffi.cdef [[
typedef struct rb_loop rb_loop;
typedef int rb_before_sleep_proc(rb_loop *loop, void *data);
rb_loop *rb_loop_new(void);
void rb_loop_free(rb_loop *loop);
int rb_loop_add_before_sleep(rb_loop *loop, rb_before_sleep_proc *proc, void *data);
void rb_loop_del_before_sleep(rb_loop *loop, rb_before_sleep_proc *proc, void *data);
int rb_loop_run_once(rb_loop *loop, int timeout_ms);
]]

describe("the loop's before-sleep hooks", function()
  local C = ffi.load(package.searchpath("rabibridge.core", package.cpath))
  local loop, proc, ran, actions

  local function id_of(data) return tonumber(ffi.cast("intptr_t", data)) end
  local function data_of(id) return ffi.cast("void *", id) end
  local function add(id) assert.equal(0, C.rb_loop_add_before_sleep(loop, proc, data_of(id))) end
  local function remove(id) C.rb_loop_del_before_sleep(loop, proc, data_of(id)) end

  -- Runs the hooks once: -> the ids of the hooks that ran, in order.
  local function round()
    ran = {}
    assert.is_true(C.rb_loop_run_once(loop, 0) >= 0)
    return ran
  end

  before_each(function()
    -- A C function that calls back into Lua must not be called from a
    -- compiled trace.
    jit.off()
    loop = assert(C.rb_loop_new())
    actions = {}
    proc = ffi.cast("rb_before_sleep_proc *", function(_, data)
      local id = id_of(data)
      ran[#ran + 1] = id
      local act = actions[id]
      actions[id] = nil -- once
      if act then act() end
      return 0
    end)
  end)

  after_each(function()
    C.rb_loop_free(loop)
    proc:free()
    jit.on()
  end)

  it("run each once per round, in the order added", function()
    for id = 1, 3 do add(id) end
    assert.same({ 1, 2, 3 }, round())
    assert.same({ 1, 2, 3 }, round())
  end)

  it("still run the rest of the round when a hook removes one that already ran", function()
    for id = 1, 4 do add(id) end
    actions[3] = function() remove(1) end
    assert.same({ 1, 2, 3, 4 }, round())
    assert.same({ 2, 3, 4 }, round())
  end)

  it("run the next hook when one removes itself, and not one removed before its turn", function()
    for id = 1, 4 do add(id) end
    actions[2] = function()
      remove(2)
      remove(3)
    end
    assert.same({ 1, 2, 4 }, round())
    assert.same({ 1, 4 }, round())
  end)

  it("run a hook added during the round in that round", function()
    add(1)
    actions[1] = function() add(2) end
    assert.same({ 1, 2 }, round())
  end)

  it("keep an outer round's place when a hook runs the loop and a nested round removes hooks", function()
    for id = 1, 4 do add(id) end
    -- Hook 2 blocks (runs the loop): the nested round runs every hook, and
    -- hook 3, there, removes hook 1. The outer round then goes on with 3
    -- and 4, as if nothing had moved.
    local nested
    actions[2] = function()
      actions[3] = function() remove(1) end
      local outer = ran
      nested = round()
      ran = outer
    end
    assert.same({ 1, 2, 3, 4 }, round())
    assert.same({ 1, 2, 3, 4 }, nested)
  end)
end)

-- A handler that waits: rabi.sleep yields its coroutine, so one worker keeps
-- serving other calls (up to fetch_size of this one) while it sleeps.
local rabi = require "rabibridge"

rabi.register_call("sleep", { fetch_size = 256, params = { "seconds:number?" }, validate = true },
  function(seconds)
    seconds = seconds or 1
    rabi.sleep(seconds)
    return ("slept %g s"):format(seconds)
  end)

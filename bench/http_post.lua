-- wrk's script: every request POSTs the echo's argument as JSON.
wrk.method = "POST"
wrk.body = "[1]"
wrk.headers["Content-Type"] = "application/json"

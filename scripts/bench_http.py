#!/usr/bin/env python3
"""wrk's report (--latency) as one JSON line of make bench's raw.jsonl.

usage: bench_http.py SCENARIO SERVER CPU_BEFORE CPU_AFTER < wrk's output
"""
import json
import re
import sys

scenario, server, before, after = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
text = sys.stdin.read()


def us(value, unit):
    return float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


pct = {p: us(v, u) for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)}
total = re.search(r"(\d+) requests in", text)
rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
if not (total and rate and "50" in pct and "99" in pct):
    sys.exit("bench_http.py: cannot read wrk's report:\n" + text)
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
failed = (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in errors.groups()) if errors else 0)
print(json.dumps({"scenario": scenario, "server": server, "client": "wrk", "calls": int(total.group(1)),
                  "calls_per_s": float(rate.group(1)), "p50_us": pct["50"], "p99_us": pct["99"],
                  "failed": failed, "server_cpu_s": after - before}))

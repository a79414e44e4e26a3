#!/usr/bin/env python3
"""Issue 16's goals in make bench: each figure beside its goal.

usage: bench_goals.py BENCH.json GOALS_DIR
    prints "figure | measured | goal | met?" and adds the list as "goals" to
    BENCH.json (written by bench_report.py). GOALS_DIR holds one file per
    fact measured outside raw.jsonl (callgrind, strace, memory).
usage: bench_goals.py --eight SERVER CPU_BEFORE CPU_AFTER CLIENT.json...
    one raw.jsonl line for the eight-function scenario, from the eight
    clients' results: throughput over the span of their measured phases,
    server CPU per call over all the calls it served (warm-ups included).
"""
import json
import os
import statistics
import sys


def eight(server, before, after, files):
    rs = [json.load(open(f)) for f in files]
    calls = sum(r["calls"] for r in rs)
    served = sum(r["calls"] + r["warmup"] for r in rs)
    seconds = max(r["t1_s"] for r in rs) - min(r["t0_s"] for r in rs)
    print(json.dumps({
        "scenario": "8 functions, 8 x window 64", "server": server, "client": "c", "calls": calls,
        "window": rs[0]["window"], "payload": 1, "seconds": seconds, "calls_per_s": calls / seconds,
        "p50_us": statistics.median(r["p50_us"] for r in rs), "p99_us": max(r["p99_us"] for r in rs),
        "failed": sum(r["failed"] for r in rs), "client_cpu_s": sum(r["client_cpu_s"] for r in rs),
        "server_cpu_s": (float(after) - float(before)) * calls / served}))


def fact(goals_dir, name):
    try:
        return float(open(os.path.join(goals_dir, name)).read())
    except (OSError, ValueError):
        return None


def report(bench_json, goals_dir):
    bench = json.load(open(bench_json))
    fig = {f["scenario"]: f for f in bench["figures"]}
    rows = []

    def ratio(name, a, b, unit, goal, at_most=True, fmt="%.1f", also=""):
        if a is None or b is None or not b:
            rows.append({"figure": name, "measured": None, "goal": goal, "met": None, "detail": "not measured"})
            return
        r = a / b
        met = None if goal is None else (r <= goal if at_most else r >= goal)
        rows.append({"figure": name, "measured": round(r, 3), "goal": goal, "at_most": at_most, "met": met,
                     "detail": ("%s / %s %s" % (fmt, fmt, unit)) % (a, b) + also})

    def pick(scenario, side, key):
        f = fig.get(scenario)
        return f[side].get(key) if f else None

    def paired_runs(host, bare):
        """How often the candidate was the lower of an alternating pair of
        runs: a median ratio near 1.0 is parity when this is near half."""
        if not host or not bare:
            return ""
        pairs = list(zip(host, bare))
        return "; lower in %d of %d runs" % (sum(1 for h, b in pairs if h <= b), len(pairs))

    w256, eight, client, pair = "echo, window 256", "8 functions, 8 x window 64", "client, window 256", \
        "pair, window 256"
    ratio("worker CPU per call, window 256 (rabihost / bare)", pick(w256, "host", "server_cpu_us_per_call"),
          pick(w256, "bare", "server_cpu_us_per_call"), "us", 1.0)
    ratio("instructions per call, callgrind (rabihost / bare)", fact(goals_dir, "ir_host"),
          fact(goals_dir, "ir_bare"), "", None, fmt="%.0f")
    ratio("syscalls per call, strace -c (rabihost / bare)", fact(goals_dir, "syscalls_host"),
          fact(goals_dir, "syscalls_bare"), "", None, fmt="%.2f")
    ratio("8 functions: calls/s (rabihost / bare)", pick(eight, "host", "calls_per_s"),
          pick(eight, "bare", "calls_per_s"), "calls/s", 0.95, at_most=False, fmt="%.0f")
    ratio("8 functions: worker CPU per call (rabihost / bare)", pick(eight, "host", "server_cpu_us_per_call"),
          pick(eight, "bare", "server_cpu_us_per_call"), "us", 1.0)
    ratio("Lua client CPU per call (Lua / C client)", pick(client, "host", "client_cpu_us_per_call"),
          pick(client, "bare", "client_cpu_us_per_call"), "us", 1.0)
    ratio("p99 at window 256 (Lua client + rabihost / bare pair)", pick(pair, "host", "p99_us"),
          pick(pair, "bare", "p99_us"), "us", 1.0, fmt="%.0f",
          also=paired_runs(pick(pair, "host", "p99_us_runs"), pick(pair, "bare", "p99_us_runs")))
    ratio("worker RSS after the 1 MiB scenario / idle", fact(goals_dir, "rss_after_1mib_kb"),
          fact(goals_dir, "rss_idle_kb"), "kB", 2.0, fmt="%.0f")

    print()
    print("issue 16's goals")
    print("%-55s | %-28s | %-7s | %s" % ("figure", "measured", "goal", "met?"))
    print("%s-|-%s-|-%s-|-%s" % ("-" * 55, "-" * 28, "-" * 7, "----"))
    for r in rows:
        measured = "-" if r["measured"] is None else "%.2fx (%s)" % (r["measured"], r["detail"].strip())
        goal = "guide" if r["goal"] is None else ("%s %.2fx" % ("<=" if r.get("at_most", True) else ">=",
                                                                  r["goal"]))
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        print("%-55s | %-28s | %-7s | %s" % (r["figure"], measured, goal, met))
    bench["goals"] = rows
    json.dump(bench, open(bench_json, "w"), indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--eight":
        eight(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        report(sys.argv[1], sys.argv[2])

#!/usr/bin/env python3
"""Summarise make bench: medians per figure, ratios to the bare baseline,
a table on stdout, the figures as JSON and the ratios as an SVG chart.

usage: bench_report.py RAW.jsonl OUT.json OUT.svg IDLE_KB PEAK_KB BARE_IDLE_KB BARE_PEAK_KB
"""
import json
import statistics
import sys

raw, out_json, out_svg = sys.argv[1:4]
idle_kb, peak_kb, bare_idle_kb, bare_peak_kb = (int(x) for x in sys.argv[4:8])
runs = [json.loads(line) for line in open(raw) if line.strip()]

groups = {}
for r in runs:
    groups.setdefault((r["scenario"], r["server"], r["client"]), []).append(r)


def median(rows, key):
    return statistics.median(r[key] for r in rows)


def summary(rows):
    calls = median(rows, "calls")
    return {
        "runs": len(rows),
        "calls_per_s": median(rows, "calls_per_s"),
        "p50_us": median(rows, "p50_us"),
        "p99_us": median(rows, "p99_us"),
        "p99_us_runs": [r["p99_us"] for r in rows],  # in run order: bare and host runs alternate
        "server_cpu_us_per_call": statistics.median(r["server_cpu_s"] / r["calls"] * 1e6 for r in rows),
        "client_cpu_us_per_call": statistics.median(r.get("client_cpu_s", 0) / r["calls"] * 1e6 for r in rows),
        "failed": sum(r["failed"] for r in rows),
        "calls": calls,
    }


scenarios = []
for r in runs:
    if r["scenario"] not in scenarios:
        scenarios.append(r["scenario"])

figures = []
for sc in scenarios:
    if sc.startswith("HTTP"):
        base, cand = groups[(sc, "fastapi", "wrk")], groups[(sc, "gateway", "wrk")]
        label_b, label_c = "FastAPI", "rabihost gw"
    elif sc.startswith("client"):
        base, cand = groups[(sc, "bare", "c")], groups[(sc, "bare", "lua")]
        label_b, label_c = "C client", "Lua client"
    elif (sc, "rabihost", "lua") in groups:  # the Lua client and rabihost against the bare pair
        base, cand = groups[(sc, "bare", "c")], groups[(sc, "rabihost", "lua")]
        label_b, label_c = "bare pair", "Lua+rabihost"
    else:
        base, cand = groups[(sc, "bare", "c")], groups[(sc, "rabihost", "c")]
        label_b, label_c = "bare server", "rabihost"
    b, c = summary(base), summary(cand)
    figures.append({"scenario": sc, "baseline": label_b, "candidate": label_c, "bare": b, "host": c,
                    "ratio": c["calls_per_s"] / b["calls_per_s"] if b["calls_per_s"] else 0})

print()
print("%-24s %-12s %10s %9s %9s %11s %7s" % ("scenario", "who", "calls|req/s", "p50 us", "p99 us", "cpu us/call", "ratio"))
for f in figures:
    for who, s, key in ((f["baseline"], f["bare"], None), (f["candidate"], f["host"], "ratio")):
        cpu = s["client_cpu_us_per_call"] if f["scenario"].startswith("client") else s["server_cpu_us_per_call"]
        print("%-24s %-12s %10.0f %9.0f %9.0f %11.1f %7s" % (
            f["scenario"], who, s["calls_per_s"], s["p50_us"], s["p99_us"], cpu,
            "%.2fx" % f["ratio"] if key else ""))
print("%-24s %-12s idle %d kB, peak %d kB (bare server: idle %d kB, peak %d kB)" % (
    "resident memory", "worker", idle_kb, peak_kb, bare_idle_kb, bare_peak_kb))
print("(medians of %d runs; failed calls: %d)" % (max(f["host"]["runs"] for f in figures),
                                                  sum(f["host"]["failed"] + f["bare"]["failed"] for f in figures)))

json.dump({"figures": figures, "memory_kb": {"worker_idle": idle_kb, "worker_peak": peak_kb,
                                             "bare_idle": bare_idle_kb, "bare_peak": bare_peak_kb}},
          open(out_json, "w"), indent=2)

# A bar per figure: the ratio to its baseline, with the goals drawn in.
w, bar_h, gap, left = 640, 26, 12, 190
h = 50 + len(figures) * (bar_h + gap) + 30
scale = (w - left - 40) / 1.2
svg = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">' % (w, h),
       '<rect width="100%" height="100%" fill="white"/>',
       '<text x="10" y="22" font-size="15">rabihost / bare rabbitmq-c (calls/s, median)</text>']
for goal in (0.8, 0.9, 1.0):
    x = left + goal * scale
    svg.append('<line x1="%.0f" y1="35" x2="%.0f" y2="%d" stroke="#bbb" stroke-dasharray="4"/>' % (x, x, h - 25))
    svg.append('<text x="%.0f" y="%d" text-anchor="middle" fill="#666">%.1fx</text>' % (x, h - 10, goal))
for i, f in enumerate(figures):
    y = 45 + i * (bar_h + gap)
    width = min(f["ratio"], 1.2) * scale
    color = "#3a7" if f["ratio"] >= (0.8 if f["scenario"].startswith("client") else 0.9) else "#d64"
    svg.append('<text x="%d" y="%d" text-anchor="end">%s</text>' % (left - 8, y + 17, f["scenario"]))
    svg.append('<rect x="%d" y="%d" width="%.0f" height="%d" fill="%s"/>' % (left, y, width, bar_h, color))
    svg.append('<text x="%.0f" y="%d">%.2fx</text>' % (left + width + 5, y + 17, f["ratio"]))
svg.append("</svg>")
open(out_svg, "w").write("\n".join(svg))
print("wrote %s and %s" % (out_json, out_svg))

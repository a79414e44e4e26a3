#!/usr/bin/env bash
# `make bench`: rabihost against a bare rabbitmq-c echo server on the same
# private broker in the same run, driven by the same pipelined C client;
# then the Lua client against the C client. Medians of BENCH_RUNS runs
# (default 5), bare and host runs interleaved so that machine noise hits
# both alike. Writes build/bench/raw.jsonl, build/bench.json, build/bench.svg.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${BENCH_RUNS:-5}
scale=${BENCH_SCALE:-1}     # multiply call counts (e.g. 0.2 for a quick look)
out=build/bench
mkdir -p "$out"
raw=$out/raw.jsonl
: > "$raw"

export RABIBRIDGE_BROKER_DIR=build/bench-broker
url=$(scripts/broker.sh start --free-port)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  scripts/broker.sh stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
echo "bench: broker $url, $runs runs per figure" >&2

calls() { python3 -c "import sys; print(max(1, int(float(sys.argv[1]) * float(sys.argv[2]))))" "$1" "$scale"; }

wait_for_line() { # FILE PATTERN COUNT [TRIES of 50 ms, default 200]
  for _ in $(seq "${4:-200}"); do
    local seen; seen=$(grep -c "$2" "$1" 2>/dev/null || true)
    [ "${seen:-0}" -ge "$3" ] && return 0
    sleep 0.05
  done
  echo "bench: timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1
}

# CPU seconds (user + system) of the given pids and their children so far.
cpu_of() {
  local total=0 p
  for p in "$@" $(for q in "$@"; do pgrep -P "$q" || true; done); do
    [ -r /proc/$p/stat ] || continue
    total=$(( total + $(awk '{print $14 + $15}' /proc/$p/stat) ))
  done
  python3 -c "import os,sys; print(int(sys.argv[1]) / os.sysconf('SC_CLK_TCK'))" "$total"
}
kb_of() { awk -v k="$2:" '$1 == k {print $2}' /proc/$1/status; } # PID VmRSS|VmHWM

start_bare() {
  build/bench/bare_echo_server "$url" bare_echo 256 2> "$out/bare.log" &
  bare_pid=$!; pids+=("$bare_pid")
  wait_for_line "$out/bare.log" "serving" 1
}

start_host() { # WORKERS
  build/rabihost serve -w "$1" --url "$url" bench/services > "$out/host-w$1.log" 2>&1 &
  host_pid=$!; pids+=("$host_pid")
  wait_for_line "$out/host-w$1.log" "serving 1 function" "$1"
  sleep 0.2
  host_worker=$(pgrep -P "$host_pid" | head -1)
}

stop_pid() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# run SCENARIO SERVER CLIENT NAME CALLS WINDOW PAYLOAD SERVER_PIDS...
run() {
  local scenario=$1 server=$2 client=$3 name=$4 n=$5 window=$6 payload=$7; shift 7
  local before after result
  before=$(cpu_of "$@")
  if [ "$client" = c ]; then
    build/bench/bench_client "$url" "$name" --calls "$n" --window "$window" --payload "$payload" \
      --json "$out/one.json" > /dev/null || true
    result=$(cat "$out/one.json")
  else
    result=$(build/rabihost run bench/lua_client.lua "$url" "$name" "$n" "$window" "$payload")
  fi
  after=$(cpu_of "$@")
  echo "$result" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
r.update(scenario=sys.argv[1], server=sys.argv[2], client=sys.argv[3],
         server_cpu_s=float(sys.argv[5]) - float(sys.argv[4]))
print(json.dumps(r))' "$scenario" "$server" "$client" "$before" "$after" >> "$raw"
  echo "bench: $scenario / $server / $client client: $(tail -1 "$raw" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("%.0f calls/s, p50 %d us, %d failed" % (r["calls_per_s"], r["p50_us"], r["failed"]))')" >&2
}

# pair SCENARIO CALLS WINDOW PAYLOAD: bare and host, interleaved, plus one
# discarded warm-up of each (the first run after a start is slower).
pair() {
  local scenario=$1 n; n=$(calls "$2")
  build/bench/bench_client "$url" bare_echo --calls "$(calls 2000)" --window "$3" --payload "$4" > /dev/null || true
  build/bench/bench_client "$url" bench_echo --calls "$(calls 2000)" --window "$3" --payload "$4" > /dev/null || true
  for _ in $(seq "$runs"); do
    run "$scenario" bare c bare_echo "$n" "$3" "$4" "$bare_pid"
    run "$scenario" rabihost c bench_echo "$n" "$3" "$4" "$host_pid"
  done
}


# ---- Issue 16's goal figures (functions; called at the end) ----------------
# Each goal of issue 16 measured in this same run beside the bare baseline;
# scripts/bench_goals.py prints them as "figure | measured | goal | met?" and
# adds them to build/bench.json.
goals=$out/goals   # one file per measured fact, its value inside
rm -rf "$goals"; mkdir -p "$goals"
fact() { echo "$2" > "$goals/$1"; } # NAME VALUE

start_host8() { # eight functions (bench/services8) in one worker
  build/rabihost serve -w 1 --url "$url" bench/services8 > "$out/host8.log" 2>&1 &
  host8_pid=$!; pids+=("$host8_pid")
  wait_for_line "$out/host8.log" "serving 8 functions" 1
  sleep 0.2
}

start_bare8() { # one bare process consuming the eight bare queues
  build/bench/bare_echo_server "$url" "$(echo bare_echo_{1..8} | tr ' ' ,)" 256 2> "$out/bare8.log" &
  bare8_pid=$!; pids+=("$bare8_pid")
  wait_for_line "$out/bare8.log" "serving" 8
}

# run8 SERVER PREFIX CALLS WINDOW SERVER_PID: eight C clients at once, one on
# each of PREFIX_1..PREFIX_8; throughput over the span of their measured
# phases, server CPU per call over every call it served (warm-ups included).
run8() {
  local server=$1 prefix=$2 n=$3 window=$4 spid=$5 before after i cpids=()
  rm -f "$out"/eight-*.json
  before=$(cpu_of "$spid")
  for i in 1 2 3 4 5 6 7 8; do
    build/bench/bench_client "$url" "${prefix}_$i" --calls "$n" --window "$window" --payload 1 \
      --json "$out/eight-$i.json" > /dev/null &
    cpids+=($!)
  done
  for i in "${cpids[@]}"; do wait "$i" || true; done
  after=$(cpu_of "$spid")
  python3 scripts/bench_goals.py --eight "$server" "$before" "$after" "$out"/eight-*.json >> "$raw"
  echo "bench: 8 functions / $server: $(tail -1 "$raw" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("%.0f calls/s, %d failed" % (r["calls_per_s"], r["failed"]))')" >&2
}

eight_functions() { # bare and host, interleaved, after one warm-up each
  local n; n=$(calls 4000)
  start_bare8
  start_host8
  run8 bare bare_echo "$(calls 500)" 64 "$bare8_pid" 2> /dev/null; sed -i '$d' "$raw"
  run8 rabihost bench_echo "$(calls 500)" 64 "$host8_pid" 2> /dev/null; sed -i '$d' "$raw"
  for _ in $(seq "$runs"); do
    run8 bare bare_echo "$n" 64 "$bare8_pid"
    run8 rabihost bench_echo "$n" 64 "$host8_pid"
  done
  stop_pid "$bare8_pid"
  stop_pid "$host8_pid"
}

# The Lua client calling rabihost against the bare pair (C client, bare
# server): p99 latency at window 256. Needs $bare_pid and $host_pid. Twice
# the runs of the other figures: a run's p99 is the latency of its slowest
# 300 calls, and a pause of the whole machine (100 ms ones are common on a
# shared VM) that a run meets twice sets it, whichever pair the run measures.
lua_pair() {
  local n; n=$(calls 30000)
  for _ in $(seq $((runs * 2))); do
    run "pair, window 256" bare c bare_echo "$n" 256 1 "$bare_pid"
    run "pair, window 256" rabihost lua bench_echo "$n" 256 1 "$host_pid"
  done
}

# served CLIENT_JSON: calls the client made, its warm-up included
served() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["calls"] + r["warmup"])' "$1"; }

# start_probe KIND DIR [WRAPPER...]: a server alone for KIND (bare or host),
# under WRAPPER (e.g. valgrind); sets probe_pid (what to stop), probe_server
# (the serving process) and probe_name (the function it serves).
start_probe() {
  local kind=$1 dir=$2; shift 2
  if [ "$kind" = bare ]; then
    "$@" build/bench/bare_echo_server "$url" probe_bare 256 > "$dir/log" 2>&1 &
    probe_pid=$!; pids+=("$probe_pid")
    wait_for_line "$dir/log" "serving" 1 1200
    probe_server=$probe_pid probe_name=probe_bare
  else
    "$@" build/rabihost serve -w 1 --url "$url" bench/services > "$dir/log" 2>&1 &
    probe_pid=$!; pids+=("$probe_pid")
    wait_for_line "$dir/log" "serving 1 function" 1 1200
    probe_server=$(pgrep -P "$probe_pid" | head -1) probe_name=bench_echo
  fi
}

# cg_run KIND CALLS -> "INSTRUCTIONS SERVED": the serving process's total
# instructions under callgrind, start and stop included, and calls served.
cg_run() {
  local dir=$out/callgrind-$1-$2
  rm -rf "$dir"; mkdir -p "$dir"
  start_probe "$1" "$dir" valgrind --tool=callgrind --smc-check=all-non-file --callgrind-out-file="$dir/cg.%p"
  build/bench/bench_client "$url" "$probe_name" --calls "$2" --window 256 --json "$dir/client.json" > /dev/null
  stop_pid "$probe_pid"
  echo "$(awk '/^totals:/ {print $2}' "$dir/cg.$probe_server") $(served "$dir/client.json")"
}

# Instructions per call: the difference of a short and a long run, so that
# start, warm-up and stop cancel out. Fixed call counts (not BENCH_SCALE).
callgrind_figures() {
  local kind i1 c1 i2 c2
  for kind in bare host; do
    read -r i1 c1 <<< "$(cg_run "$kind" 500)"
    read -r i2 c2 <<< "$(cg_run "$kind" 3000)"
    fact "ir_$kind" "$(python3 -c 'import sys; i1,c1,i2,c2=map(float,sys.argv[1:]); print(round((i2-i1)/(c2-c1)))' "$i1" "$c1" "$i2" "$c2")"
    echo "bench: callgrind $kind: $(cat "$goals/ir_$kind") instructions per call" >&2
  done
}

# Syscalls per call: strace -c -f attached to the serving process for a run
# of fixed length after a warm-up.
strace_figures() {
  local kind dir st
  for kind in bare host; do
    dir=$out/strace-$kind
    rm -rf "$dir"; mkdir -p "$dir"
    start_probe "$kind" "$dir"
    build/bench/bench_client "$url" "$probe_name" --calls 1000 --window 256 > /dev/null
    strace -c -f -p "$probe_server" -o "$dir/strace.txt" 2> "$dir/strace.log" &
    st=$!
    sleep 0.5
    build/bench/bench_client "$url" "$probe_name" --calls 5000 --window 256 --json "$dir/client.json" > /dev/null
    kill -INT "$st"; wait "$st" || true
    stop_pid "$probe_pid"
    fact "syscalls_$kind" "$(awk -v n="$(served "$dir/client.json")" '$NF == "total" {printf "%.2f\n", $4 / n}' "$dir/strace.txt")"
    echo "bench: strace $kind: $(cat "$goals/syscalls_$kind") syscalls per call" >&2
  done
}
# ---- end of issue 16's functions --------------------------------------------

start_bare
start_host 1
idle_rss=$(kb_of "$host_worker" VmRSS)
bare_idle_rss=$(kb_of "$bare_pid" VmRSS)
echo "bench: idle worker RSS ${idle_rss} kB (bare server ${bare_idle_rss} kB)" >&2

pair "echo, window 256" 30000 256 1
pair "echo, window 1" 3000 1 1
pair "10 KiB, window 64" 5000 64 10240
pair "1 MiB, window 4" 200 4 1048576
peak_rss=$(kb_of "$host_worker" VmHWM)
sleep 1; fact rss_after_1mib_kb "$(kb_of "$host_worker" VmRSS)"; fact rss_idle_kb "$idle_rss" # issue 16
bare_peak_rss=$(kb_of "$bare_pid" VmHWM)

# The Lua client against the C client, both calling the bare server.
n=$(calls 30000)
build/rabihost run bench/lua_client.lua "$url" bare_echo "$(calls 2000)" 256 1 > /dev/null
for _ in $(seq "$runs"); do
  run "client, window 256" bare c bare_echo "$n" 256 1 "$bare_pid"
  run "client, window 256" bare lua bare_echo "$n" 256 1 "$bare_pid"
done

lua_pair # issue 16

stop_pid "$host_pid"
start_host 2
for _ in $(seq "$runs"); do
  run "echo -w 2, window 256" bare c bare_echo "$n" 256 1 "$bare_pid"
  run "echo -w 2, window 256" rabihost c bench_echo "$n" 256 1 "$host_pid"
done

# The combined HTTP echo (issue 14): wrk against the gateway calling the
# echo over the broker, and against a FastAPI app doing the same with
# aio-pika, as RabiBridge's production guide puts it; one worker or one
# uvicorn process each, both calling the -w 2 host above. CPU per request
# is the HTTP front's (the echo service's is the same for both).
http_seconds=${BENCH_HTTP_SECONDS:-3}
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
gw_port=$(free_port)
build/rabihost gateway --listen "127.0.0.1:$gw_port" -w 1 --url "$url" > "$out/gateway.log" 2>&1 &
gw_pid=$!; pids+=("$gw_pid")
wait_for_line "$out/gateway.log" "started 1 worker" 1
fa_port=$(free_port)
/usr/bin/python3 bench/fastapi_echo.py "$url" "$fa_port" bench_echo > "$out/fastapi.log" 2>&1 &
fa_pid=$!; pids+=("$fa_pid")
for _ in $(seq 100); do curl -s -o /dev/null -X POST -d '[1]' "http://127.0.0.1:$fa_port/rpc/bench_echo" && break; sleep 0.1; done
for _ in $(seq 100); do curl -s -o /dev/null -X POST -d '[1]' "http://127.0.0.1:$gw_port/rpc/bench_echo" && break; sleep 0.1; done
http_run() { # SERVER PORT PIDS...
  local server=$1 port=$2 before after; shift 2
  before=$(cpu_of "$@")
  wrk -t 1 -c 32 -d "${http_seconds}s" --latency -s bench/http_post.lua "http://127.0.0.1:$port/rpc/bench_echo" \
    > "$out/wrk.txt"
  after=$(cpu_of "$@")
  python3 scripts/bench_http.py "HTTP echo, 32 conns" "$server" "$before" "$after" < "$out/wrk.txt" >> "$raw"
  echo "bench: HTTP echo / $server: $(tail -1 "$raw" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("%.0f requests/s, p99 %d us, %d failed" % (r["calls_per_s"], r["p99_us"], r["failed"]))')" >&2
}
wrk -t 1 -c 32 -d 1s -s bench/http_post.lua "http://127.0.0.1:$gw_port/rpc/bench_echo" > /dev/null
wrk -t 1 -c 32 -d 1s -s bench/http_post.lua "http://127.0.0.1:$fa_port/rpc/bench_echo" > /dev/null
for _ in $(seq "$runs"); do
  http_run fastapi "$fa_port" "$fa_pid"
  http_run gateway "$gw_port" "$gw_pid"
done

# Issue 16: eight functions, instructions and syscalls per call.
stop_pid "$host_pid"
stop_pid "$bare_pid"
eight_functions
callgrind_figures
strace_figures

python3 scripts/bench_report.py "$raw" build/bench.json build/bench.svg \
  "$idle_rss" "$peak_rss" "$bare_idle_rss" "$bare_peak_rss"
python3 scripts/bench_goals.py build/bench.json "$goals" # issue 16

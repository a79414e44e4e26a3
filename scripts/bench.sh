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

wait_for_line() { # FILE PATTERN COUNT
  for _ in $(seq 200); do
    [ "$(grep -c "$2" "$1" 2>/dev/null || true)" -ge "$3" ] && return 0
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
bare_peak_rss=$(kb_of "$bare_pid" VmHWM)

# The Lua client against the C client, both calling the bare server.
n=$(calls 30000)
build/rabihost run bench/lua_client.lua "$url" bare_echo "$(calls 2000)" 256 1 > /dev/null
for _ in $(seq "$runs"); do
  run "client, window 256" bare c bare_echo "$n" 256 1 "$bare_pid"
  run "client, window 256" bare lua bare_echo "$n" 256 1 "$bare_pid"
done

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

python3 scripts/bench_report.py "$raw" build/bench.json build/bench.svg \
  "$idle_rss" "$peak_rss" "$bare_idle_rss" "$bare_peak_rss"

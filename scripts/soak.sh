#!/usr/bin/env bash
# Soak: CALLS echo calls (default 1,000,000) through one rabihost worker on a
# private broker, its resident memory sampled after warm-up and at the end.
# Passes when the growth after warm-up stays under 5%.
set -euo pipefail
cd "$(dirname "$0")/.."
total=${CALLS:-1000000}
chunk=100000
export RABIBRIDGE_BROKER_DIR=build/soak-broker
url=$(scripts/broker.sh start --free-port)
host=
trap '[ -n "$host" ] && kill -TERM $host 2>/dev/null; wait 2>/dev/null; scripts/broker.sh stop >/dev/null 2>&1 || true' EXIT
mkdir -p build/soak
build/rabihost serve --url "$url" bench/services > build/soak/host.log 2>&1 &
host=$!
for _ in $(seq 100); do grep -q "serving 1 function" build/soak/host.log && break; sleep 0.1; done
worker=$(pgrep -P "$host" | head -1)
rss() { awk '$1 == "VmRSS:" {print $2}' /proc/"$worker"/status; }
build/bench/bench_client "$url" bench_echo --calls "$chunk" --window 256 > /dev/null   # warm-up
base=$(rss)
echo "soak: after warm-up ($chunk calls) worker RSS ${base} kB" >&2
done_calls=0
while [ "$done_calls" -lt "$total" ]; do
  build/bench/bench_client "$url" bench_echo --calls "$chunk" --window 256 > /dev/null
  done_calls=$((done_calls + chunk))
  echo "soak: $done_calls calls, worker RSS $(rss) kB" >&2
done
end=$(rss)
growth=$(python3 -c "print('%.1f' % (100.0 * ($end - $base) / $base))")
echo "soak: $total calls; worker RSS ${base} kB -> ${end} kB (${growth}% growth)"
python3 -c "import sys; sys.exit(0 if $end <= $base * 1.05 else 1)"

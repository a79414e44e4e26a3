#!/usr/bin/env bash
# `make run`: serve services/ on a broker. RABIBRIDGE_URL when set; else a
# broker already answering on localhost:5672; else a private node started on
# 5672 for this run and stopped after it.
set -euo pipefail
cd "$(dirname "$0")/.."

port_answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [ -n "${RABIBRIDGE_URL:-}" ]; then
  url=$RABIBRIDGE_URL
elif port_answers 5672; then
  url="amqp://guest:guest@localhost:5672/"
else
  export RABIBRIDGE_BROKER_PORT=5672
  url=$(scripts/broker.sh start)
  trap 'scripts/broker.sh stop' EXIT
fi
export RABIBRIDGE_URL=$url
# The URL as it may be shown: whatever stands between "user:" and the last
# "@" of each URL is a password, and so is all after "user:" when a URL has
# no "@" and no port there (the rule rabihost's own messages follow).
shown=$(printf '%s\n' "$url" | sed -E 's#(://[^:@/ ]*):[^ ]*@#\1:****@#g; /@/! s#(://[^:/ ]*):([^0-9 ][^ ]*|[0-9]*[^0-9/ ][^ ]*)#\1:****#g')
echo "rabihost: serving services/ on ${shown} (Ctrl-C to stop)" >&2
echo "rabihost: try: build/rabihost call add 2 3   or   build/rabihost repl" >&2
# Not exec: the trap above must stop the private broker when we are done.
# In a session of its own: a Ctrl-C in the terminal reaches this script
# alone, which passes one stop signal on. Sharing our process group, the
# host got the terminal's SIGINT and the trap's SIGTERM, and took the two
# for "stop now" without draining. A second Ctrl-C still stops it at once.
setsid build/rabihost serve "$@" services/ &
host=$!
trap 'kill -TERM $host 2>/dev/null || true' INT TERM
wait $host || true
wait $host 2>/dev/null || true

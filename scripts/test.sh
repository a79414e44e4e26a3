#!/usr/bin/env bash
# `make test`: a private broker on a free loopback port (never a broker the
# user runs), the whole busted suite against it, and the broker stopped after.
set -euo pipefail
cd "$(dirname "$0")/.."

export RABIBRIDGE_BROKER_DIR=build/test-broker
url=$(scripts/broker.sh start --free-port)
trap 'scripts/broker.sh stop >/dev/null 2>&1 || true' EXIT
export RABIBRIDGE_URL=$url
export RABIBRIDGE_CTL="$PWD/scripts/broker.sh ctl"
echo "test broker: $url" >&2
# Debian's busted script starts PUC Lua; the suite needs LuaJIT.
luajit /usr/bin/busted "$@"

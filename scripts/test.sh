#!/usr/bin/env bash
# `make test`: a private broker on a free loopback port (never a broker the
# user runs), the whole busted suite against it, and the broker stopped after.
#
# Specs tagged #cluster (busted's tag, in a describe or it name) also get a
# private three-node cluster (scripts/cluster.sh, build/test-cluster, free
# ports), started only when a selected spec file carries the tag, or always
# with RABIBRIDGE_TEST_CLUSTER=1 (never with =0). They find it in
#   RABIBRIDGE_CLUSTER_URLS  the nodes' AMQP URLs, node 1 first, space-separated
#   RABIBRIDGE_CLUSTER_CTL   a command prefix running scripts/cluster.sh on it:
#                            `$RABIBRIDGE_CLUSTER_CTL kill 2`, `... ctl 1 ARGS`
#   RABIBRIDGE_CLUSTER_DIR   its state folder
set -euo pipefail
cd "$(dirname "$0")/.."

# Whether the spec files busted will run (the path arguments, or spec/ when
# there are none) include one tagged #cluster.
wants_cluster() {
  local a paths=()
  for a in "$@"; do [ -e "$a" ] && paths+=("$a"); done
  [ ${#paths[@]} -gt 0 ] || paths=(spec)
  grep -rlq --include='*_spec.lua' -e '#cluster' -- "${paths[@]}"
}

cluster=
case "${RABIBRIDGE_TEST_CLUSTER:-auto}" in
  1) cluster=1 ;;
  0) ;;
  auto) if wants_cluster "$@"; then cluster=1; fi ;;
  *) echo "test.sh: RABIBRIDGE_TEST_CLUSTER: expected 0, 1 or auto" >&2; exit 2 ;;
esac

export RABIBRIDGE_BROKER_DIR=build/test-broker
cluster_dir=$PWD/build/test-cluster
# shellcheck disable=SC2317 # called by the trap
stop_all() {
  scripts/broker.sh stop >/dev/null 2>&1 || true
  if [ -n "$cluster" ]; then RABIBRIDGE_CLUSTER_DIR=$cluster_dir scripts/cluster.sh stop >/dev/null 2>&1 || true; fi
}
trap stop_all EXIT
trap 'exit 143' TERM INT HUP # so that the EXIT trap runs on a signal too
url=$(scripts/broker.sh start --free-port)
export RABIBRIDGE_URL=$url
export RABIBRIDGE_CTL="$PWD/scripts/broker.sh ctl"
echo "test broker: $url" >&2
if [ -n "$cluster" ]; then
  export RABIBRIDGE_CLUSTER_DIR=$cluster_dir
  RABIBRIDGE_CLUSTER_URLS=$(scripts/cluster.sh start | tr '\n' ' ')
  export RABIBRIDGE_CLUSTER_URLS=${RABIBRIDGE_CLUSTER_URLS% }
  RABIBRIDGE_CLUSTER_CTL=$(printf 'env RABIBRIDGE_CLUSTER_DIR=%q %q' "$cluster_dir" "$PWD/scripts/cluster.sh")
  export RABIBRIDGE_CLUSTER_CTL
  echo "test cluster: $RABIBRIDGE_CLUSTER_URLS" >&2
fi
# Debian's busted script starts PUC Lua; the suite needs LuaJIT.
luajit /usr/bin/busted "$@"

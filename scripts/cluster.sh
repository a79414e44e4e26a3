#!/usr/bin/env bash
# A private three-node RabbitMQ cluster on loopback, for development and tests.
#
#   scripts/cluster.sh start            start it (or the nodes of it that are
#                                       down); print the AMQP URLs
#   scripts/cluster.sh stop             stop every node and the cluster's epmd
#   scripts/cluster.sh status           each node and whether it runs; exit 1
#                                       unless all three run
#   scripts/cluster.sh url              the AMQP URLs, one line per node, node 1
#                                       first (also while a node is down)
#   scripts/cluster.sh kill N           SIGKILL node N (1, 2 or 3): a crash
#   scripts/cluster.sh revive N         start node N again with its data; it
#                                       finds its cluster and queues again
#   scripts/cluster.sh ctl N ARGS...    rabbitmqctl ARGS against node N
#
# Environment: RABIBRIDGE_CLUSTER_DIR (state, default build/cluster, relative
# to the repository root), RABIBRIDGE_CLUSTER_PORTS (three AMQP ports, e.g.
# "5701 5702 5703"; default: free ones, so that CI and a developer's cluster
# or broker never collide).
#
# Each node is a scripts/broker.sh node (Debian's rabbitmq-server, loopback
# only, /etc/rabbitmq kept out) in $RABIBRIDGE_CLUSTER_DIR/nN, named
# rabibridge-nN-PORT@localhost. What makes three of them a cluster: one Erlang
# cookie copied into each node's HOME, and one private epmd on a free
# loopback port that all three register with (not the shared one on 4369, so
# a broker the user runs is never seen or touched). Node 1 boots first; nodes
# 2 and 3 then boot together and join it (peer discovery from a list). A
# fresh `start` begins with empty nodes; `revive` keeps the node's data, so
# it is the restart of a crashed node.
set -euo pipefail

# free_ports and port_free
# shellcheck source=scripts/broker.sh
. "$(dirname "${BASH_SOURCE[0]}")/broker.sh"
broker=$root/scripts/broker.sh
cdir=${RABIBRIDGE_CLUSTER_DIR:-build/cluster}
[[ $cdir = /* ]] || cdir=$root/$cdir
cdir=$(realpath -ms -- "$cdir")
# A broker setting meant for one node (a TLS listener on a fixed port) would
# clash three times over.
unset RABIBRIDGE_BROKER_EXTRA_CONF

say() { echo "cluster.sh: $*" >&2; }

# State from $cdir/state: epmd_port and ports ("P1 P2 P3").
load_cluster() {
  [ -f "$cdir/state" ] || return 1
  local ports=''
  # shellcheck disable=SC1091
  . "$cdir/state"
  read -ra port_of <<<"$ports"
}

name_of() { echo "rabibridge-n$1-${port_of[$1 - 1]}@localhost"; }
url_of() { echo "amqp://guest:guest@127.0.0.1:${port_of[$1 - 1]}/"; }

# scripts/broker.sh ARGS for node N, on its own port, name and folder, with
# the cluster's epmd.
node_broker() {
  local n=$1
  shift
  RABIBRIDGE_BROKER_DIR=$cdir/n$n RABIBRIDGE_BROKER_PORT=${port_of[$n - 1]} \
    RABIBRIDGE_BROKER_NODE=$(name_of "$n") RABIBRIDGE_BROKER_EPMD_PORT=$epmd_port \
    "$broker" "$@"
}

node_running() { node_broker "$1" status >/dev/null 2>&1; }

urls() { local n; for n in 1 2 3; do url_of "$n"; done; }

# The same cookie for the three nodes (and rabbitmqctl, which reads it from
# the node's HOME): distribution refuses a peer with another.
share_cookie() {
  local n
  mkdir -p "$cdir/n1/home" "$cdir/n2/home" "$cdir/n3/home"
  rm -f "$cdir"/n?/home/.erlang.cookie
  (umask 077 && od -An -N20 -tx1 /dev/urandom | tr -d ' \n' >"$cdir/n1/home/.erlang.cookie")
  for n in 2 3; do cp "$cdir/n1/home/.erlang.cookie" "$cdir/n$n/home/.erlang.cookie"; done
  chmod 400 "$cdir"/n?/home/.erlang.cookie
}

# Starts nodes N... at once (the 2 cores boot them faster together than one
# by one). Each start's messages go to $cdir/nN.start; on a failure they are
# shown. -> 0 if all started
start_nodes() {
  local n pids=() failed=''
  for n in "$@"; do
    # A blank node with a join.conf joins node 1 as it boots.
    if [ ${#start_args[@]} = 0 ] && [ -f "$cdir/n$n.join.conf" ]; then
      export RABIBRIDGE_BROKER_EXTRA_CONF=$cdir/n$n.join.conf
    fi
    node_broker "$n" start "${start_args[@]}" >/dev/null 2>"$cdir/n$n.start" &
    pids+=($!)
    unset RABIBRIDGE_BROKER_EXTRA_CONF
  done
  for n in "$@"; do
    if ! wait "${pids[0]}"; then
      failed=1
      say "node $n failed to start:"
      cat "$cdir/n$n.start" >&2
    fi
    pids=("${pids[@]:1}")
  done
  [ -z "$failed" ]
}

# Node N's settings for its first boot: join node 1 (peer discovery from a
# list). Faster than booting alone and then `rabbitmqctl stop_app;
# join_cluster; start_app`: no second start of the app. The node lists
# itself too, or it warns that it is not part of the cluster it joins.
join_conf() {
  printf 'cluster_formation.peer_discovery_backend = classic_config\n'
  printf 'cluster_formation.classic_config.nodes.1 = %s\n' "$(name_of 1)"
  printf 'cluster_formation.classic_config.nodes.2 = %s\n' "$(name_of "$1")"
}

# Whether node 1 runs with all three nodes in its cluster.
all_joined() {
  local out n
  out=$(node_broker 1 ctl -q cluster_status --formatter json) || return 1
  for n in 1 2 3; do
    [[ $out = *'"running_nodes":['*"\"$(name_of "$n")\""* ]] || return 1
  done
}

cmd_start() {
  local n p1 p2 p3 t0=$SECONDS down=() start_args=()
  if load_cluster; then
    for n in 1 2 3; do node_running "$n" || down+=("$n"); done
    if [ ${#down[@]} = 0 ]; then urls; return 0; fi
    if [ ${#down[@]} -lt 3 ]; then
      # Nodes that died: start them again as `revive` does.
      start_args=(--keep-data)
      start_nodes "${down[@]}" || return 1
      urls
      return 0
    fi
  fi
  cmd_stop # leftovers of a cluster whose nodes all died
  [ -x "$bin/rabbitmq-server" ] || { say "rabbitmq-server is not installed (apt-get install rabbitmq-server)"; return 1; }
  if [ -n "${RABIBRIDGE_CLUSTER_PORTS:-}" ]; then
    read -ra port_of <<<"$RABIBRIDGE_CLUSTER_PORTS"
    [ ${#port_of[@]} = 3 ] || { say "RABIBRIDGE_CLUSTER_PORTS: expected three ports, got '$RABIBRIDGE_CLUSTER_PORTS'"; return 1; }
    for n in 0 1 2; do
      port_free "${port_of[n]}" || { say "port ${port_of[n]} on 127.0.0.1 is taken"; return 1; }
    done
    read -r epmd_port < <(free_ports 1)
  else
    read -r p1 p2 p3 epmd_port < <(free_ports 4)
    port_of=("$p1" "$p2" "$p3")
  fi
  mkdir -p "$cdir"
  printf 'epmd_port=%s\nports="%s"\n' "$epmd_port" "${port_of[*]}" >"$cdir/state"
  share_cookie
  # The cluster's epmd, loopback only. -relaxed_command_check lets `stop`
  # kill it even while a node is still registered.
  ERL_EPMD_PORT=$epmd_port ERL_EPMD_ADDRESS=127.0.0.1 epmd -daemon -relaxed_command_check
  # Node 1 first, then the two others join it as they boot, side by side
  # (two blank nodes booting together could each start a cluster of their own).
  rm -f "$cdir"/n?.join.conf
  if ! start_nodes 1; then cmd_stop; return 1; fi
  for n in 2 3; do join_conf "$n" >"$cdir/n$n.join.conf"; done
  if ! start_nodes 2 3 || ! all_joined; then
    say "nodes 2 and 3 did not both join node 1 (logs in $cdir/n?/log)"
    cmd_stop
    return 1
  fi
  say "cluster of $(name_of 1), $(name_of 2), $(name_of 3) up in $((SECONDS - t0)) s (state in $cdir)"
  urls
}

cmd_stop() {
  load_cluster || return 0
  local n
  for n in 1 2 3; do node_broker "$n" stop & done
  wait
  ERL_EPMD_ADDRESS=127.0.0.1 epmd -port "$epmd_port" -kill >/dev/null 2>&1 || true
  rm -f "$cdir/state"
}

cmd_status() {
  local n all=0
  if ! load_cluster; then
    echo "not running (state in $cdir)"
    return 1
  fi
  for n in 1 2 3; do
    if node_running "$n"; then
      echo "node $n: $(node_broker "$n" status)"
    else
      echo "node $n: down: $(name_of "$n") on 127.0.0.1:${port_of[n - 1]}"
      all=1
    fi
  done
  echo "epmd on 127.0.0.1:$epmd_port, state in $cdir"
  return $all
}

need_cluster() { load_cluster || { say "no cluster (state in $cdir); run: scripts/cluster.sh start"; exit 1; }; }

need_node() {
  case "${1:-}" in
    1 | 2 | 3) ;;
    *) say "expected a node number 1, 2 or 3, got '${1:-}'"; exit 2 ;;
  esac
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  url) need_cluster; urls ;;
  kill) need_node "${2:-}"; need_cluster; node_broker "$2" kill ;;
  revive)
    need_node "${2:-}"
    need_cluster
    node_broker "$2" start --keep-data >/dev/null
    ;;
  ctl)
    need_node "${2:-}"
    need_cluster
    n=$2
    shift 2
    node_broker "$n" ctl "$@"
    ;;
  *) sed -n '2,14s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac

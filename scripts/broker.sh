#!/usr/bin/env bash
# A private RabbitMQ node for development and tests (README: Checks).
#
#   scripts/broker.sh start [--free-port] [--keep-data]
#                                          start it; print its AMQP URL
#   scripts/broker.sh stop                 stop it (no-op when not running)
#   scripts/broker.sh status               say whether it runs; exit 1 if not
#   scripts/broker.sh url                  print the URL of the running node
#   scripts/broker.sh ctl ARGS...          rabbitmqctl ARGS against the node
#   scripts/broker.sh kill                 SIGKILL the node (a crash, for tests)
#
# Environment: RABIBRIDGE_BROKER_DIR (state, default build/broker, relative to
# the repository root), RABIBRIDGE_BROKER_PORT (AMQP port, default 5672;
# --free-port picks a free one instead), RABIBRIDGE_BROKER_NODE (node name,
# default rabibridge-PORT@localhost), RABIBRIDGE_BROKER_EXTRA_CONF (a file
# appended to the node's rabbitmq.conf, e.g. a TLS listener),
# RABIBRIDGE_BROKER_EPMD_PORT (register with an epmd the caller runs on that
# loopback port, and neither start nor kill one: how scripts/cluster.sh puts
# its nodes in reach of each other).
#
# --keep-data keeps mnesia and the logs of the node's last run: with the same
# port and node name it is a restart of that node (e.g. one that was killed),
# which finds its queues, messages and cluster again. A cookie already in
# $RABIBRIDGE_BROKER_DIR/home/.erlang.cookie is kept (scripts/cluster.sh puts
# the same one in its three nodes).
#
# Everything the node owns lives in the state folder: HOME (Erlang cookie),
# mnesia, logs, pid file, config. It listens on 127.0.0.1 only and runs its
# own epmd on a private port, so a system broker (rabbit@host, epmd on 4369)
# is never seen or touched. Each start begins with empty mnesia and logs.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${RABIBRIDGE_BROKER_DIR:-build/broker}
[[ $dir = /* ]] || dir=$root/$dir
# One spelling of it (no // nor trailing /): `ours` finds the node by it.
dir=$(realpath -ms -- "$dir")
bin=/usr/lib/rabbitmq/bin # not /usr/sbin: that wrapper switches to the rabbitmq user

say() { echo "broker.sh: $*" >&2; }

# N distinct free loopback ports, below the kernel's ephemeral range: a
# node restarted on its port (a cluster's revived node) must find it free,
# and a port the kernel hands out as the local end of some connection (a
# client's, reconnecting while the node is down) would not be.
free_ports() {
  python3 -c '
import random, socket, sys
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
out = []
while len(out) < int(sys.argv[1]):
    port = random.randrange(max(1024, low - 12000), low)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    if port not in out:
        out.append(port)
print(" ".join(map(str, out)))' "$1"
}

port_free() { python3 -c 'import socket, sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null; }

# The environment shared by the server and rabbitmqctl. State comes from
# $dir/state (port, node, dist_port, epmd_port, epmd_owned).
node_env() {
  export HOME=$dir/home # rabbitmqctl finds the node's cookie here too
  export RABBITMQ_NODENAME=$node
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$port
  export RABBITMQ_DIST_PORT=$dist_port
  export RABBITMQ_MNESIA_BASE=$dir/mnesia
  export RABBITMQ_LOG_BASE=$dir/log
  export RABBITMQ_PID_FILE=$dir/pid
  export RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins
  export RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf
  # Keep /etc/rabbitmq (env file, conf.d, advanced.config) out of it.
  export RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf
  export RABBITMQ_CONFIG_FILES=$dir/conf.d
  export RABBITMQ_ADVANCED_CONFIG_FILE=$dir/advanced.config
  # A private epmd: the shared one on 4369 would outlive us (or belong to a
  # system broker). `start` starts it, `stop` kills it.
  export ERL_EPMD_PORT=$epmd_port ERL_EPMD_ADDRESS=127.0.0.1
  # Erlang distribution (node and CLI) on loopback only, not 0.0.0.0.
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
  export RABBITMQ_CTL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
}

load_state() {
  [ -f "$dir/state" ] || return 1
  # shellcheck disable=SC1091
  . "$dir/state"
  node_env
}

# Whether process $1 is our node's VM: its command line has `-home $dir/home`
# (a pid left in a file may belong to someone else by now).
ours() { tr '\0' '\n' 2>/dev/null <"/proc/$1/cmdline" | grep -qxF -- "$dir/home"; }

# The node's OS pid, when its VM is alive.
node_pid() {
  local pid
  pid=$(cat "$dir/pid" 2>/dev/null) && [ -n "$pid" ] && ours "$pid" && echo "$pid"
}

running() { load_state && node_pid >/dev/null; }

url() { echo "amqp://guest:guest@127.0.0.1:$port/"; }

show_logs() {
  local f
  for f in "$dir/server.out" "$dir/log/$node.log"; do
    [ -s "$f" ] && { say "--- tail of $f"; tail -n 60 "$f" >&2; }
  done
  return 0
}

cmd_start() {
  local free_port='' keep_data='' a attempt
  for a in "$@"; do
    case $a in
      --free-port) free_port=1 ;;
      --keep-data) keep_data=1 ;;
      *) say "start: unknown option $a (expected --free-port or --keep-data)"; return 2 ;;
    esac
  done
  if running; then url; return 0; fi
  [ -x "$bin/rabbitmq-server" ] || { say "rabbitmq-server is not installed (apt-get install rabbitmq-server)"; return 1; }
  # A port found free may be taken before the node binds it: by a node
  # booting beside this one (the faults spec starts two at once), or by
  # anything else on the machine. Ports are picked again on such a clash
  # only; any other failure ends the start at once.
  for attempt in 1 2 3; do
    cmd_stop # leftovers of a node that died: its epmd, its state
    pick_ports "$free_port" || return 1
    prepare_dir "$keep_data"
    if boot_node; then
      say "node $node up on 127.0.0.1:$port in $boot_seconds s (state in $dir)"
      url
      return 0
    fi
    if [ "$attempt" -lt 3 ] && port_clash; then
      say "node $node found one of its ports taken ($(port_clash_line)); trying other ports"
      continue
    fi
    say "node $node failed to start"
    cat "$dir/wait.err" >&2 || true
    show_logs
    cmd_stop
    return 1
  done
}

# Sets port, dist_port, epmd_port, epmd_owned and node. $1: non-empty to
# pick the AMQP port too.
pick_ports() {
  if [ -n "$1" ]; then
    read -r port dist_port epmd_port < <(free_ports 3)
  else
    port=${RABIBRIDGE_BROKER_PORT:-5672}
    port_free "$port" || { say "port $port on 127.0.0.1 is taken"; return 1; }
    read -r dist_port epmd_port < <(free_ports 2)
  fi
  epmd_owned=yes
  if [ -n "${RABIBRIDGE_BROKER_EPMD_PORT:-}" ]; then
    epmd_port=$RABIBRIDGE_BROKER_EPMD_PORT epmd_owned=no
  fi
  node=${RABIBRIDGE_BROKER_NODE:-rabibridge-$port@localhost}
}

# Writes the node's config and state. $1: non-empty to keep mnesia and logs.
prepare_dir() {
  rm -f "$dir/pid" "$dir/server.out"
  [ -n "$1" ] || rm -rf "$dir/mnesia" "$dir/log"
  mkdir -p "$dir/home" "$dir/mnesia" "$dir/log" "$dir/conf.d"
  # The cookie: the node and rabbitmqctl read it from $HOME, which is ours.
  if [ ! -s "$dir/home/.erlang.cookie" ]; then
    (umask 077 && od -An -N20 -tx1 /dev/urandom | tr -d ' \n' >"$dir/home/.erlang.cookie")
    chmod 400 "$dir/home/.erlang.cookie"
  fi
  : >"$dir/rabbitmq-env.conf"
  echo '[].' >"$dir/enabled_plugins"
  # guest/guest is allowed from 127.0.0.1 by default. A low disk limit so the
  # node starts (and accepts publishes) on small disks; quiet logs.
  cat >"$dir/rabbitmq.conf" <<'EOF2'
disk_free_limit.absolute = 50MB
log.console = false
log.file.level = warning
EOF2
  # Extra settings for one test, e.g. a TLS listener (spec/tls_spec.lua).
  if [ -n "${RABIBRIDGE_BROKER_EXTRA_CONF:-}" ]; then cat "$RABIBRIDGE_BROKER_EXTRA_CONF" >>"$dir/rabbitmq.conf"; fi
  write_state
  node_env
}

write_state() {
  printf 'port=%s\nnode=%s\ndist_port=%s\nepmd_port=%s\nepmd_owned=%s\n' \
    "$port" "$node" "$dist_port" "$epmd_port" "$epmd_owned" >"$dir/state"
}

# Starts epmd and the node and waits until it serves. -> 1 if it died
# first; sets boot_seconds.
boot_node() {
  # Our own epmd, loopback only, on the private port. -relaxed_command_check
  # lets `stop` kill it even if a node is still registered. A port taken
  # since it was picked fails the boot as a clash (before `stop` could kill
  # an epmd that is not ours).
  if [ "$epmd_owned" = yes ]; then
    if ! port_free "$epmd_port"; then
      echo "epmd port $epmd_port: eaddrinuse" >"$dir/server.out"
      epmd_owned=no # not ours to kill
      write_state
      return 1
    fi
    epmd -daemon -relaxed_command_check
  fi
  # setsid: a Ctrl-C meant for the caller (make run) does not reach the node;
  # the caller stops it with `stop`. No stdio is inherited, so a pipe such as
  # `make test | tee` does not wait for the node.
  (cd "$dir" && exec setsid "$bin/rabbitmq-server" </dev/null >"$dir/server.out" 2>&1) &
  local server=$! t0=$SECONDS ok=
  echo "$server" >"$dir/pgid" # setsid did not fork: its pid leads the group
  "$bin/rabbitmqctl" -n "$node" -q wait "$dir/pid" --timeout 60 </dev/null >/dev/null 2>"$dir/wait.err" &
  local waiter=$!
  # Watch both, so a node that dies early fails at once, not after 60 s.
  # (The waiter is an Erlang VM: SIGTERM makes it exit 0, hence the flag.)
  while :; do
    if ! kill -0 "$waiter" 2>/dev/null; then
      wait "$waiter" && ok=1
      break
    fi
    if ! kill -0 "$server" 2>/dev/null; then
      kill "$waiter" 2>/dev/null || true
      wait "$waiter" || true
      break
    fi
    sleep 0.1
  done
  boot_seconds=$((SECONDS - t0))
  [ -n "$ok" ]
}

# The line of the node's output saying a port it needed was taken: the
# distribution port (dist_port_already_used), a listener's (eaddrinuse) or
# our epmd's (then the node cannot register: nodistribution).
port_clash_line() {
  local clash='dist_port_already_used,[0-9]*\|eaddrinuse'
  [ "$epmd_owned" = no ] || clash="$clash\\|nodistribution"
  grep -h -m1 -o "$clash" "$dir/server.out" "$dir/log/$node.log" 2>/dev/null | head -n1
}
port_clash() { [ -n "$(port_clash_line)" ]; }

# Whether process group $1 has a member that is not a zombie (the wrapper's
# zombie waits for init, which may take its time).
# shellcheck disable=SC2009 # pgrep cannot skip zombies
live() { ps -o stat= -g "$1" 2>/dev/null | grep -qv '^Z'; }

# The node's process group (the wrapper script, the VM and its helpers), if
# it still holds our VM, not a recycled pid's.
our_group() {
  local pgid p
  pgid=$(cat "$dir/pgid" 2>/dev/null) || return 1
  for p in $(pgrep -g "$pgid"); do
    if ours "$p"; then echo "$pgid"; return 0; fi
  done
  return 1
}

# Sends signal $2 to process group $1 and waits up to $3 tenths of a second
# for it to end. -> 1 if it still lives
end_group() {
  kill "-$2" -- "-$1" 2>/dev/null || true
  for _ in $(seq "$3"); do live "$1" || return 0; sleep 0.1; done
  ! live "$1"
}

cmd_stop() {
  load_state || return 0
  # SIGTERM to the server's process group: RabbitMQ then stops gracefully,
  # as with `rabbitmqctl stop` but without starting a second VM, and a node
  # still booting goes too. KILL after 30 s.
  local pgid
  if pgid=$(our_group); then
    end_group "$pgid" TERM 300 || kill -KILL -- "-$pgid" 2>/dev/null || true
  fi
  # State from before epmd_owned existed: the epmd was ours.
  [ "${epmd_owned:-yes}" = no ] || epmd -port "$epmd_port" -kill >/dev/null 2>&1 || true
  rm -f "$dir/state" "$dir/pid" "$dir/pgid"
}

# SIGKILL to the node's process group, as a crash or a power cut would: no
# goodbye to its clients or its cluster. The state stays, so `stop` (or a
# `start`) cleans up after it as after any node that died.
cmd_kill() {
  local pgid
  pgid=$(our_group) || { say "node $node is not running"; return 1; }
  end_group "$pgid" KILL 100 || { say "node $node did not die"; return 1; }
}

cmd_status() {
  if running; then
    echo "running: $node on 127.0.0.1:$port, pid $(node_pid), state in $dir"
  else
    echo "not running (state in $dir)"
    return 1
  fi
}

need_running() { running || { say "no broker running (state in $dir); run: scripts/broker.sh start"; exit 1; }; }

# Sourced (scripts/cluster.sh): the functions only.
if [ "${BASH_SOURCE[0]}" != "$0" ]; then return 0; fi

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  url) need_running; url ;;
  ctl) shift; need_running; exec "$bin/rabbitmqctl" -n "$node" "$@" ;;
  kill) need_running; cmd_kill ;;
  *) sed -n '2,10s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Starts a private broker (scripts/broker.sh start --free-port, in
# RABIBRIDGE_BROKER_DIR) whose first pick of ports hands the node a port
# that something else holds: as its distribution port (dist), its AMQP
# port (amqp) or its epmd's (epmd). Prints "held PORT", what the start
# printed, and "running" if the node then runs; stops it; exits with the
# start's status.
#
#   spec/tools/broker_clash.sh dist|amqp|epmd
set -uo pipefail
which=$1
# shellcheck source=scripts/broker.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/broker.sh"
set +e

# The holder: a listening socket on a port the kernel chose.
exec 3< <(exec python3 -c '
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(s.getsockname()[1], flush=True)
time.sleep(600)')
holder=$!
read -r held <&3
echo "held $held"

# broker.sh's own free_ports, but its first answer has $held in it. It runs
# in a subshell (read < <(...)), so a file says whether it has answered.
eval "$(declare -f free_ports | sed '1s/^free_ports/picked_ports/')"
first=$(mktemp)
free_ports() {
  local p
  read -r -a p < <(picked_ports "$1")
  if [ -e "$first" ]; then
    rm -f "$first"
    case $which:$1 in
      dist:3) p[1]=$held ;;
      amqp:3) p[0]=$held ;;
      epmd:3) p[2]=$held ;;
    esac
  fi
  echo "${p[*]}"
}

cmd_start --free-port
rc=$?
if running; then echo running; fi
cmd_stop
kill "$holder" 2>/dev/null
rm -f "$first"
exit "$rc"

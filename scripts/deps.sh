#!/usr/bin/env bash
# scripts/deps.sh WHAT PACKAGE...: install the Debian packages that WHAT
# (say "make test") needs and that are not installed yet. As root with
# apt-get; otherwise through sudo. A user who can do neither gets the exact
# list to hand to someone who can, and a non-zero exit.
set -euo pipefail

what=$1
shift

missing=()
for p in "$@"; do
  if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed'; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

stuck() {
  {
    echo "$what needs these Debian packages, which are not installed:"
    echo "    ${missing[*]}"
    echo "$1; ask someone who is root to run"
    echo "    apt-get install ${missing[*]}"
    echo "then run $what again."
  } >&2
  exit 1
}

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "$what needs these Debian packages (or your system's equivalents): ${missing[*]}" >&2
  exit 1
fi

sudo=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || stuck "You are not root and sudo is not installed"
  # -n: never wait for a password nobody will type (CI, make without a tty).
  if [ -t 0 ]; then sudo=(sudo); else sudo=(sudo -n); fi
  "${sudo[@]}" true 2>/dev/null || stuck "You are not root and sudo does not let you in"
fi

echo "$what: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
install() { "${sudo[@]}" apt-get install -y -qq "${missing[@]}"; }
# The package lists are fetched only when the install cannot find a package
# (a fresh machine has none): most runs skip the network.
if ! install >/dev/null 2>&1; then
  "${sudo[@]}" apt-get update -qq
  install
fi

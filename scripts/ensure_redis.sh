#!/usr/bin/env bash
# Make sure redis-server is installed: the local stack (prefstream stack up) runs Debian's Redis.
# Installs with apt-get only when it is missing, so it is cheap to call from `make` every time.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "ensure_redis: redis-server is missing and we are not root (no sudo); install it: apt-get install -y redis-server" >&2
    exit 1
  fi
fi

echo "ensure_redis: installing redis-server with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends redis-server
# Debian starts a system redis on 6379 after install; the stack runs its own, so stop that one
# when a service manager is there (ignored in containers without one).
$SUDO service redis-server stop >/dev/null 2>&1 || true
command -v redis-server >/dev/null

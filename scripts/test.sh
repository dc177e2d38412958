#!/usr/bin/env bash
# Runs every test of the workspace. On a fresh Debian machine it first installs what the tests
# need (redis-server: the Redis backends are tested against a real server that the tests start
# themselves on free ports), so it works from a clean clone.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "test.sh: installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
# The Debian package may start a server on 6379; the tests never use it (they start their own).

cargo test --workspace --all-targets
cargo test --workspace --doc

# The chat page in a real (headless) browser against a real chat-server.
if [ -x scripts/browser-test.sh ]; then
  scripts/browser-test.sh
fi

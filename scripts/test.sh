#!/usr/bin/env bash
# Runs every test of the workspace. Installs what the tests need when it is missing, so it works
# on a fresh machine (Debian, as root or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# (Redis and browser tests arrive with their crates; their packages are added here.)
if [ "${#need_apt[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

cargo test --workspace --all-targets
cargo test --workspace --doc

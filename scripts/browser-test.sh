#!/usr/bin/env bash
# The chat page (examples/static/index.html) in a real headless browser against a real
# chat-server: two users in two browser contexts (examples/browser-test/chat.test.mjs).
#
# Works on a fresh Debian machine as root (or with sudo): installs Debian's chromium if
# /usr/bin/chromium is missing, `npm ci` in examples/browser-test (playwright-core only, no
# browser download), builds chat-server, runs the test. Idempotent; the test starts and always
# stops its own server on a free loopback port, so nothing is left running.
#
#   scripts/browser-test.sh            # exit status: 0 passed, non-zero failed
#   CHROMIUM_PATH=/path/to/chrome scripts/browser-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
say() { printf 'browser-test: %s\n' "$*"; }

CHROMIUM="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
  if [ -n "${CHROMIUM_PATH:-}" ]; then
    say "CHROMIUM_PATH=$CHROMIUM is not an executable"; exit 1
  fi
  say "installing Debian's chromium (apt-get)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
  [ -x "$CHROMIUM" ] || { say "chromium is still missing at $CHROMIUM"; exit 1; }
fi
say "browser: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"

for tool in node npm cargo; do
  command -v "$tool" >/dev/null 2>&1 || { say "$tool is required but not on PATH"; exit 1; }
done

say "npm ci in examples/browser-test"
# No browser download: playwright-core never fetches one, and this makes sure nothing else does.
(cd examples/browser-test && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)

say "building chat-server"
cargo build --bin chat-server

say "running the test"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
export CHAT_SERVER_BIN="$TARGET_DIR/debug/chat-server"
export CHROMIUM_PATH="$CHROMIUM"
if (cd examples/browser-test && node --test --test-concurrency=1 chat.test.mjs); then
  say "PASSED (screenshots in examples/browser-test/screenshots/)"
else
  status=$?
  say "FAILED (exit $status); failure screenshots in examples/browser-test/screenshots/"
  exit "$status"
fi

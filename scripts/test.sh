#!/usr/bin/env bash
# Runs every test of the workspace. On a fresh Debian machine it first installs what the tests
# need (redis-server: the Redis backends are tested against a real server that the tests start
# themselves on free ports), so it works from a clean clone.
#
# ScyllaStore is tested on a real CQL node: an Apache Cassandra 5.0 node that scripts/cassandra.sh
# resolves from Maven Central into ${XDG_CACHE_HOME:-$HOME/.cache}/chat-sdk/cassandra and starts
# on free loopback ports, in the background while cargo builds; it is stopped on exit. That needs
# Java 11 or 17 and Maven (mvn). Without them the ScyllaStore tests are skipped with a loud
# message; CHAT_TEST_SCYLLA_URI=host:port uses an existing node (ScyllaDB or Cassandra) instead.
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

# ---- the CQL node for chat-store/tests/scylla_store.rs (and the CQL cluster tests)
skip_cql=()
cass_pid=""
if [ -n "${CHAT_TEST_SCYLLA_URI:-}" ]; then
  echo "test.sh: using the CQL node at CHAT_TEST_SCYLLA_URI=$CHAT_TEST_SCYLLA_URI"
elif ! scripts/cassandra.sh java >/dev/null 2>&1 || ! command -v "${MVN:-mvn}" >/dev/null 2>&1; then
  cat >&2 <<'EOF'
########################################################################################
## test.sh: SKIPPING the ScyllaStore tests (chat-store/tests/scylla_store.rs and the  ##
## CQL cluster tests): they need Java 11 or 17 and Maven to run Apache Cassandra.     ##
## Debian: apt-get install -y openjdk-17-jre-headless maven                           ##
########################################################################################
EOF
  # The CQL tests are named cql_* or live in a `cql` module; nothing else is.
  skip_cql=(-- --skip cql_ --skip cql::)
else
  # A port nothing listens on (the node binds it a few seconds later).
  free_port() {
    local p
    for _ in $(seq 1 50); do
      p=$((20000 + RANDOM % 40000))
      (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return 0; }
    done
    echo 19042
  }
  export CQL_PORT=${CQL_PORT:-$(free_port)}
  export STORAGE_PORT=${STORAGE_PORT:-$(free_port)}
  export CASS_HOME=${CASS_HOME:-${TMPDIR:-/tmp}/chat-sdk-cassandra-$$}
  cass_log="$CASS_HOME.start.log"
  mkdir -p "$(dirname "$cass_log")"
  stop_cassandra() {
    scripts/cassandra.sh stop >/dev/null 2>&1 || true
    rm -rf "$CASS_HOME" "$cass_log"
  }
  trap stop_cassandra EXIT
  cass_t0=$SECONDS
  scripts/cassandra.sh start >"$cass_log" 2>&1 &
  cass_pid=$!
  export CHAT_TEST_SCYLLA_URI="127.0.0.1:$CQL_PORT"
  echo "test.sh: starting Cassandra for the ScyllaStore tests on $CHAT_TEST_SCYLLA_URI (log: $cass_log)"
fi

cargo test --workspace --all-targets --no-run
if [ -n "$cass_pid" ]; then
  if ! wait "$cass_pid"; then
    echo "test.sh: Cassandra did not start:" >&2
    cat "$cass_log" >&2
    exit 1
  fi
  echo "test.sh: Cassandra ready $((SECONDS - cass_t0))s after launch: $(tail -1 "$cass_log")"
fi

cargo test --workspace --all-targets "${skip_cql[@]}"
cargo test --workspace --doc

# The chat page in a real (headless) browser against a real chat-server.
if [ -x scripts/browser-test.sh ]; then
  scripts/browser-test.sh
fi

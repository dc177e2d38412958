#!/usr/bin/env bash
# Starts Centrifugo, the Go peer of `chat-load --scenario peer-centrifugo-*`, with
# benches/peers/centrifugo.json: anonymous connections without a token, namespace `chat` where a
# client may subscribe and, once subscribed, publish; no history, presence or join/leave
# messages; logs at warn. `chat-load` starts it itself (`--bind 127.0.0.1:<free port>`);
# by hand:
#
#   benches/peers/start-centrifugo.sh --bind 127.0.0.1:8000     # or PEER_BIND=...
#
# Clients: ws://ADDR/connection/websocket, JSON protocol v2; channels `chat:<group>`.
# The binary: $PEER_CENTRIFUGO_BIN, else target/peers/bin/centrifugo, installed by
# install-centrifugo.sh on first use. It is exec'd, so this script's pid is Centrifugo's
# (chat-load samples its RSS and CPU from /proc/<pid>). Extra arguments go to Centrifugo.
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$DIR/../.." && pwd)"
BIN="${PEER_CENTRIFUGO_BIN:-$ROOT/target/peers/bin/centrifugo}"
CONFIG="${PEER_CENTRIFUGO_CONFIG:-$DIR/centrifugo.json}"
BIND="${PEER_BIND:-127.0.0.1:8000}"

extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bind) BIND="$2"; shift 2 ;;
        *) extra+=("$1"); shift ;;
    esac
done

if [[ ! -x "$BIN" ]]; then
    BIN="$("$DIR/install-centrifugo.sh")"
fi

exec "$BIN" --config "$CONFIG" \
    --http_server.address "${BIND%:*}" --http_server.port "${BIND##*:}" \
    "${extra[@]}"

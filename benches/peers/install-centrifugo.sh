#!/usr/bin/env bash
# Installs Centrifugo (the peer server of `chat-load --scenario peer-centrifugo*`) from the Go
# module proxy with `go install`, into target/peers/bin/centrifugo. Nothing of it is vendored.
#
#   benches/peers/install-centrifugo.sh            # the pinned version below
#   PEER_CENTRIFUGO_VERSION=v6.9.1 benches/peers/install-centrifugo.sh
#
# Needs Go >= 1.26 (v6.9.1's go directive; with GOTOOLCHAIN=local an older Go stops with
# "go.mod requires go >= 1.26" instead of fetching a toolchain). The module proxy reachable
# here lists only v6.9.1 of .../centrifugo/v6 and refuses .../centrifugo/v5 (403). The module
# cache is Go's usual one ($(go env GOMODCACHE)); a first install downloads ~150 modules and
# takes ~4 min on 2 cores. Prints the binary's path on stdout. Idempotent: a binary of the
# wanted version already there is kept.
set -euo pipefail

VERSION="${PEER_CENTRIFUGO_VERSION:-v6.9.1}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN_DIR="${PEER_CENTRIFUGO_BIN_DIR:-$ROOT/target/peers/bin}"
BIN="$BIN_DIR/centrifugo"
STAMP="$BIN_DIR/centrifugo.version"

if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$VERSION" ]]; then
    echo "$BIN"
    exit 0
fi

command -v go >/dev/null || { echo "install-centrifugo: go not found in PATH" >&2; exit 1; }
mkdir -p "$BIN_DIR"
echo "install-centrifugo: go install github.com/centrifugal/centrifugo/v6@$VERSION -> $BIN_DIR" >&2
# The major version is part of the module path: v6.x.y lives at .../centrifugo/v6.
MAJOR="${VERSION%%.*}"
# -trimpath: reproducible; -X ...build.Version: what Centrifugo's release builds stamp (without
# it, it reports 0.0.0 and warns that it is a development build); nice: the box is shared.
GOBIN="$BIN_DIR" nice -n 10 go install -trimpath \
    -ldflags "-X github.com/centrifugal/centrifugo/$MAJOR/internal/build.Version=${VERSION#v}" \
    "github.com/centrifugal/centrifugo/$MAJOR@$VERSION" >&2
echo "$VERSION" >"$STAMP"
"$BIN" version >&2 || true
echo "$BIN"

#!/usr/bin/env bash
# Installs Centrifugo (the peer server of `chat-load --scenario peer-centrifugo*`) from the Go
# module proxy with `go install`, into target/peers/bin/centrifugo. Nothing of it is vendored.
#
#   benches/peers/install-centrifugo.sh            # the pinned version below
#   CENTRIFUGO_VERSION=v6.9.1 benches/peers/install-centrifugo.sh
#
# Needs Go >= 1.24 (the module's go directive); the module cache is Go's usual one
# ($(go env GOMODCACHE)). Prints the binary's path on stdout. Idempotent: a binary of the
# wanted version already there is kept.
set -euo pipefail

VERSION="${CENTRIFUGO_VERSION:-v6.9.1}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN_DIR="${CENTRIFUGO_BIN_DIR:-$ROOT/target/peers/bin}"
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

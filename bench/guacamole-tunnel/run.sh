#!/usr/bin/env bash
# Guacamole tunnel benchmark: exoagent guacamole-web versus guacamole-lite (npm) relaying the same
# stream from one fake guacd, with the direct TCP path as baseline (throughput, added latency,
# relay CPU and peak RSS, byte-exactness, WebSocket framing, a UTF-8 split test).
#
#   bash bench/guacamole-tunnel/run.sh [--runs 10] [--mib 64] [--round-trips 10000] [--warmup 500] [--json FILE]
#
# npm-ci's the pinned guacamole-lite and ws, builds exoagent (release) from this checkout unless
# EXOAGENT_BIN names a binary, and prints a Markdown table; bench/results/guacamole-tunnel.md
# records past runs. All traffic stays on 127.0.0.1.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
if [ -z "${EXOAGENT_BIN:-}" ]; then
  (cd "$repo" && cargo build --release -p exoagent -q)
  EXOAGENT_BIN=$repo/target/release/exoagent
fi
EXOAGENT_BIN=$(realpath "$EXOAGENT_BIN")
dirty=$(git -C "$repo" status --porcelain -- agent web 2>/dev/null | grep -q . && echo ', uncommitted changes in agent/ or web/' || true)
echo "exoagent: $EXOAGENT_BIN; checkout $repo at $(git -C "$repo" rev-parse --short HEAD)$dirty; $(date -u +%FT%TZ)" >&2
cd "$here" && exec node bench.mjs --bin "$EXOAGENT_BIN" "$@"

#!/usr/bin/env bash
# TLS front benchmark: exoagent's `front` versus nginx (Debian's) terminating the same TLS 1.3
# (one ECDSA P-256 certificate made for the run) in front of the same loopback backend, with the
# direct path as baseline: requests/s (1 KiB) and MiB/s (1 MiB) with wrk at 1, 16 and 64
# keep-alive connections, latency p50/p99 and the latency each front adds, WebSocket echo round
# trips, front CPU per request and front RSS (idle and under load).
#
#   bash bench/tls-front/run.sh [--reps 3] [--duration 5] [--warmup 1] [--conns 1,16,64]
#        [--bodies 1k,1m] [--ws-round-trips 2000] [--ws-sizes 32,65536]
#        [--load-cpus 1 --server-cpus 0] [--json FILE]
#
# Installs nginx and wrk (apt) when missing, npm-ci's the pinned `ws`, builds exoagent (release,
# CARGO_BUILD_JOBS=1 unless set) from this checkout unless EXOAGENT_BIN names a binary, then
# prints a Markdown table (progress on stderr); bench/results/tls-front.md records past runs.
# Everything listens on 127.0.0.1 only. About 7 minutes after the build with the defaults.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v wrk >/dev/null || missing+=(wrk)
command -v openssl >/dev/null || missing+=(openssl)
command -v node >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
if [ -z "${EXOAGENT_BIN:-}" ]; then
  (cd "$repo" && CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo build --release -p exoagent -q)
  EXOAGENT_BIN=$repo/target/release/exoagent
fi
EXOAGENT_BIN=$(realpath "$EXOAGENT_BIN")
dirty=$(git -C "$repo" status --porcelain -- agent 2>/dev/null | grep -q . && echo ', uncommitted changes in agent/' || true)
echo "exoagent: $EXOAGENT_BIN; checkout $repo at $(git -C "$repo" rev-parse --short HEAD)$dirty; $(nginx -v 2>&1); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); node $(node --version); $(uname -r); $(date -u +%FT%TZ)" >&2
exec python3 "$here/bench.py" --bin "$EXOAGENT_BIN" "$@"

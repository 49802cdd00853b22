#!/usr/bin/env bash
# How long the login banner (`exoagent motd`) takes, which is how long it adds to a login
# (DESIGN §4.6: never more than 100 ms): with the agent up (idle, and with both cores busy as
# during a setup), with no agent, and with an agent that accepts but never answers (the
# deadline). Release binary, throw-away sandboxes, hyperfine (Debian package `hyperfine`).
#
#   bash bench/login-banner.sh [RUNS]   (default 200)
#
# Prints hyperfine's Markdown table; bench/results/login-banner.md records past runs.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-200}
command -v hyperfine >/dev/null || { echo "hyperfine is missing: apt-get install hyperfine" >&2; exit 1; }
cargo build --release -p exoagent -q
bin=$PWD/target/release/exoagent
up=$(mktemp -d /tmp/exoagent-banner-up-XXXXXX)
down=$(mktemp -d /tmp/exoagent-banner-down-XXXXXX)
hung=$(mktemp -d /tmp/exoagent-banner-hung-XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$up/etc/exoagent" "$hung/run/exoagent"
# A service that fails at once (no usable Python): the snapshot then has a step, a reason and
# a detail, the longest banner a single service gives.
cat > "$up/etc/exoagent/config.toml" <<TOML
[services.jupyterlab]
enabled = true
bind = "127.0.0.1"
port = $port
python = "/bin/false"
TOML
"$bin" sandbox "$up" >"$up/agent.stdout" 2>"$up/agent.stderr" &
agent=$!
# Accepts every connection, holds it, and never answers (a hung agent).
python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(64)
held = []
while True:
    held.append(s.accept()[0])
' "$hung/run/exoagent/exoagent.sock" &
silent=$!
hogs=()
cleanup() {
  kill "${hogs[@]}" "$silent" "$agent" 2>/dev/null || true
  wait "$agent" 2>/dev/null || true
  "$bin" --sandbox-dir "$up" down >/dev/null 2>&1 || true
  rm -rf "$up" "$down" "$hung"
}
trap cleanup EXIT
"$bin" --sandbox-dir "$up" status --wait --timeout 60s >/dev/null || true   # ends in error
"$bin" --sandbox-dir "$up" motd

table() { hyperfine -N --warmup 10 --runs "$runs" --style none --export-markdown "$1" "${@:2}" >/dev/null 2>&1; }
table "$up/idle.md" \
  -n "agent up" "$bin --sandbox-dir $up motd" \
  -n "agent down" "$bin --sandbox-dir $down motd" \
  -n "agent never answers" "$bin --sandbox-dir $hung motd"
# Both cores busy, as while packages install during setup.
for _ in 1 2; do (while :; do :; done) & hogs+=($!); done
table "$up/busy.md" \
  -n "agent up, 2 busy loops" "$bin --sandbox-dir $up motd" \
  -n "agent down, 2 busy loops" "$bin --sandbox-dir $down motd" \
  -n "agent never answers, 2 busy loops" "$bin --sandbox-dir $hung motd"
cat "$up/idle.md"
tail -n +3 "$up/busy.md"

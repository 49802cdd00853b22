#!/usr/bin/env bash
# Idle footprint of the agent while it supervises JupyterLab (DESIGN §7: RSS <= 10 MiB,
# CPU <= 0.1 %). Runs the release binary in a throw-away sandbox, waits until setup is complete,
# lets it settle, then samples the agent's and the shim's RSS and CPU time over a window.
#
#   bash bench/idle-footprint.sh [WINDOW_SECONDS [ALERT_INTERVAL_SECONDS]]   (default 120, 30)
#
# The resource-alert watcher runs as shipped (on, a sample every 30 s) unless the second
# argument sets its interval (1 puts thirty times its default cost on the agent) or is `off`.
# Prints a Markdown table row (agent max RSS, agent CPU, shim RSS, shim CPU, and JupyterLab's own
# RSS for scale); bench/results/idle-footprint.md records past runs.
set -euo pipefail
cd "$(dirname "$0")/.."
window=${1:-120}
alert_interval=${2:-30}
bash installer/dev/prereqs.sh >/dev/null
cargo build --release -p exoagent -q
bin=target/release/exoagent
sb=$(mktemp -d /tmp/exoagent-bench-XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$sb/etc/exoagent"
cat > "$sb/etc/exoagent/config.toml" <<TOML
[services.jupyterlab]
enabled = true
bind = "127.0.0.1"
port = $port

[alerts]
$( [ "$alert_interval" = off ] && echo "enabled = false" || echo "interval_s = $alert_interval" )
TOML
"$bin" sandbox "$sb" >"$sb/agent.stdout" 2>"$sb/agent.stderr" &
agent=$!
cleanup() { kill "$agent" 2>/dev/null || true; wait "$agent" 2>/dev/null || true; "$bin" --sandbox-dir "$sb" down >/dev/null 2>&1 || true; rm -rf "$sb"; }
trap cleanup EXIT
"$bin" --sandbox-dir "$sb" status --wait --timeout 600s >/dev/null
sleep 10   # let start-up allocations settle

shim=$(pgrep -f "^$PWD/$bin shim" | head -n1 || true)
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/{print $2}' "/proc/$1/status"; }
a0=$(ticks "$agent"); s0=$( [ -n "$shim" ] && ticks "$shim" || echo 0 ); t0=$(date +%s.%N)
max_rss=0
for _ in $(seq "$window"); do
  r=$(rss_kib "$agent"); [ "$r" -gt "$max_rss" ] && max_rss=$r
  sleep 1
done
a1=$(ticks "$agent"); s1=$( [ -n "$shim" ] && ticks "$shim" || echo 0 ); t1=$(date +%s.%N)
shim_rss=$( [ -n "$shim" ] && rss_kib "$shim" || echo 0 )
jpid=$("$bin" --sandbox-dir "$sb" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["services"][0]["pid"] or 0)')
jl_rss=$( [ "$jpid" != 0 ] && rss_kib "$jpid" || echo 0 )
python3 - "$a0" "$a1" "$s0" "$s1" "$t0" "$t1" "$hz" "$max_rss" "$shim_rss" "$window" "$jl_rss" "$alert_interval" <<'PY'
import sys, platform, datetime
a0,a1,s0,s1=map(int,sys.argv[1:5]); t0,t1=map(float,sys.argv[5:7]); hz=int(sys.argv[7])
max_rss,shim_rss,window,jl_rss=int(sys.argv[8]),int(sys.argv[9]),int(sys.argv[10]),int(sys.argv[11])
alerts="off" if sys.argv[12] == "off" else f"every {sys.argv[12]} s"
el=t1-t0
cpu=100*(a1-a0)/hz/el; scpu=100*(s1-s0)/hz/el
print(f"| {datetime.date.today()} | {platform.node()} | {window} s | {alerts} | {max_rss/1024:.1f} MiB | {cpu:.3f} % | {shim_rss/1024:.1f} MiB | {scpu:.3f} % | {jl_rss/1024:.1f} MiB |")
PY

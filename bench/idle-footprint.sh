#!/usr/bin/env bash
# Idle footprint of the agent while it supervises JupyterLab (DESIGN §7: RSS <= 10 MiB,
# CPU <= 0.1 %). Runs the release binary in a throw-away sandbox, waits until setup is complete,
# lets it settle, then samples the agent's and the shim's RSS and CPU time over a window.
#
#   bash bench/idle-footprint.sh [WINDOW_S [ALERT_INTERVAL_S|off [IDLE_INTERVAL_S|off
#                                 [REQUEST_INTERVAL_S|off]]]]        (default 120, 30, 60, 60)
#
# Every watcher runs as shipped unless an argument sets its interval or turns it `off`: the
# resource alerts (a sample every 30 s), the idle detector (every 60 s: /proc files, utmp, and
# JupyterLab's /api/status and /api/kernels signed in with the passphrase) and the cloud-request
# watcher (meta_data.json every 60 s ± 25 %), which asks a stand-in metadata service on loopback
# (bench/metadata-standin.py: Nova's document for one instance; it counts the calls).
# Prints a Markdown table row (agent max RSS, agent CPU, shim RSS, shim CPU, metadata calls in
# the window and per hour, and JupyterLab's own RSS for scale); bench/results/idle-footprint.md
# records past runs.
set -euo pipefail
cd "$(dirname "$0")/.."
window=${1:-120}
alert_interval=${2:-30}
idle_interval=${3:-60}
request_interval=${4:-60}
bash installer/dev/prereqs.sh >/dev/null
cargo build --release -p exoagent -q
bin=target/release/exoagent
sb=$(mktemp -d /tmp/exoagent-bench-XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$sb/etc/exoagent"
python3 bench/metadata-standin.py "$sb/metadata.port" "$sb/metadata.calls" &
standin=$!
for _ in $(seq 50); do [ -s "$sb/metadata.port" ] && break; sleep 0.1; done
cat > "$sb/etc/exoagent/config.toml" <<TOML
[services.jupyterlab]
enabled = true
bind = "127.0.0.1"
port = $port

[cloud]
metadata_url = "http://127.0.0.1:$(cat "$sb/metadata.port")"
publish_password = false
$( [ "$request_interval" = off ] && echo "watch_request = false" || echo "request_interval_s = $request_interval" )

[alerts]
$( [ "$alert_interval" = off ] && echo "enabled = false" || echo "interval_s = $alert_interval" )

[idle]
$( [ "$idle_interval" = off ] && echo "enabled = false" || echo "interval_s = $idle_interval" )
TOML
"$bin" sandbox "$sb" --no-fixture-identity >"$sb/agent.stdout" 2>"$sb/agent.stderr" &
agent=$!
cleanup() { kill "$agent" "$standin" 2>/dev/null || true; wait "$agent" 2>/dev/null || true; "$bin" --sandbox-dir "$sb" down >/dev/null 2>&1 || true; rm -rf "$sb"; }
trap cleanup EXIT
"$bin" --sandbox-dir "$sb" status --wait --timeout 600s >/dev/null
sleep 10   # let start-up allocations settle

shim=$(pgrep -f "^$PWD/$bin shim" | head -n1 || true)
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/{print $2}' "/proc/$1/status"; }
a0=$(ticks "$agent"); s0=$( [ -n "$shim" ] && ticks "$shim" || echo 0 ); t0=$(date +%s.%N)
m0=$(wc -l < "$sb/metadata.calls")
max_rss=0
for _ in $(seq "$window"); do
  r=$(rss_kib "$agent"); [ "$r" -gt "$max_rss" ] && max_rss=$r
  sleep 1
done
a1=$(ticks "$agent"); s1=$( [ -n "$shim" ] && ticks "$shim" || echo 0 ); t1=$(date +%s.%N)
m1=$(wc -l < "$sb/metadata.calls")
shim_rss=$( [ -n "$shim" ] && rss_kib "$shim" || echo 0 )
# What the agent's RSS is made of at the end: its own private memory, and pages mapped from files
# (its executable's text and read-only data, shared with the shims, droppable by the kernel).
anon=$(awk '/^RssAnon/{print $2}' "/proc/$agent/status"); file=$(awk '/^RssFile/{print $2}' "/proc/$agent/status")
echo "agent RssAnon ${anon} KiB, RssFile ${file} KiB" >&2
jpid=$("$bin" --sandbox-dir "$sb" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["services"][0]["pid"] or 0)')
jl_rss=$( [ "$jpid" != 0 ] && rss_kib "$jpid" || echo 0 )
python3 - "$a0" "$a1" "$s0" "$s1" "$t0" "$t1" "$hz" "$max_rss" "$shim_rss" "$window" "$jl_rss" "$alert_interval" "$idle_interval" "$request_interval" "$m0" "$m1" <<'PY'
import sys, platform, datetime
a0,a1,s0,s1=map(int,sys.argv[1:5]); t0,t1=map(float,sys.argv[5:7]); hz=int(sys.argv[7])
max_rss,shim_rss,window,jl_rss=int(sys.argv[8]),int(sys.argv[9]),int(sys.argv[10]),int(sys.argv[11])
every=lambda v: "off" if v == "off" else f"{v} s"
watchers=f"alerts {every(sys.argv[12])}, idle {every(sys.argv[13])}, request {every(sys.argv[14])}"
m0,m1=int(sys.argv[15]),int(sys.argv[16])
el=t1-t0
cpu=100*(a1-a0)/hz/el; scpu=100*(s1-s0)/hz/el
calls=m1-m0
print(f"| {datetime.date.today()} | {platform.node()} | {window} s | {watchers} | {max_rss/1024:.1f} MiB | {cpu:.3f} % | {shim_rss/1024:.1f} MiB | {scpu:.3f} % | {calls} ({calls*3600/el:.0f}/h) | {jl_rss/1024:.1f} MiB |")
PY

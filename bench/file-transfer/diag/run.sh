#!/bin/bash
# Diagnostic (not a test, not shipped): one download of a SIZE-byte sparse file (random first and
# last MiB) through the real guacd 1.3.0's SSH SFTP (tests/guacamole/guacd-bullseye.sh's root)
# with sftp_stress.py as the client; says WHOLE or SHORT. As root, after tests/guacamole/setup.sh,
# under `flock /work/notes/browser.lock` where others share the rig user.
#   run.sh MODE SIZE   MODE: plain | nodelay (TCP_NODELAY on guacd's sockets by readspy.so) |
#                      relay (py_relay.py, the SSH relay's socket options, between guacd and sshd)
#   GLOG=debug: guacd's log level; STALL=N [STALL_AT=S]: stop sshd's SFTP session N s after S s.
# guacd runs with readspy.so preloaded: failed libssh2_sftp_read/_write calls are logged with
# libssh2's last error. Logs in $OUT (default /tmp/exoagent-sftp-diag).
set -u
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
OUT=${OUT:-/tmp/exoagent-sftp-diag}
mkdir -p "$OUT"
gcc -shared -fPIC -O2 -o "$OUT/readspy.so" "$here/readspy.c" -ldl
mode=$1; size=$2
cd "$repo"
root=/var/tmp/exoagent-guacd-bullseye
cp "$OUT/readspy.so" $root/readspy.so
exec 3< <(sleep 100000)
rm -f $OUT/rig.json
setsid /var/tmp/exoagent-guac-venv/bin/python tests/guacamole/rig.py --no-peer --ssh-rsa <&3 >$OUT/rig.json 2>$OUT/rig.err &
RIG_PID=$!
for i in $(seq 100); do [ -s $OUT/rig.json ] && break; sleep 0.2; done
user=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["user"])' "$OUT/rig.json")
home=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["home"])' "$OUT/rig.json")
pw=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["password"])' "$OUT/rig.json")
sport=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ssh_port"])' "$OUT/rig.json")
f="$home/stress-big.bin"
python3 - "$f" "$size" <<'PY'
import os, sys
p, n = sys.argv[1], int(sys.argv[2])
with open(p, "wb") as f:
    f.write(os.urandom(1 << 20)); f.truncate(n); f.seek(n - (1 << 20)); f.write(os.urandom(1 << 20))
PY
chown "$user" "$f"
gport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nd=0; [ "$mode" = nodelay ] && nd=1
setpriv --pdeathsig KILL -- unshare --pid --fork --kill-child --mount --propagation private -- bash -c "
  mount -t proc proc $root/proc; mount --bind /dev/pts $root/dev/pts
  exec chroot $root env LD_PRELOAD=/readspy.so SPY_NODELAY=$nd /usr/sbin/guacd -b 127.0.0.1 -l $gport -f -L ${GLOG:-info}" 2>$OUT/guacd-$mode.log &
gpid=$!
target_port=$sport
if [ "$mode" = relay ]; then
  rport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  python3 "$here/py_relay.py" $rport $sport 2>$OUT/relay.log &
  rpid=$!
  target_port=$rport
fi
sleep 1
if [ -n "${STALL:-}" ]; then
  ( sleep ${STALL_AT:-4}; p=$(pgrep -u "$user" -f "sftp-server|@notty" | head -1); echo "stalling sftp-server $p for $STALL s"; kill -STOP $p; sleep $STALL; kill -CONT $p; echo "resumed" ) &
fi
setsid /var/tmp/exoagent-guac-venv/bin/python "$here/sftp_stress.py" $gport 127.0.0.1 $target_port "$user" "$pw" "$f" "$size"
rc=$?
kill $gpid ${rpid:-} 2>/dev/null
rm -f "$f"
exec 3<&-; pkill -f "sleep 100000"
wait $RIG_PID 2>/dev/null
grep -E "readspy|Error|rror" $OUT/guacd-$mode.log | head -20
echo "rc=$rc"

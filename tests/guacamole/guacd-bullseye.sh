#!/usr/bin/env bash
# A real guacd 1.3.0 — the version Ubuntu 22.04/24.04 instances get from universe — from
# Debian 11 (bullseye) packages, for the tests. As root.
#
#   bash tests/guacamole/guacd-bullseye.sh build       # the root, once (~40 s, ~160 MB)
#   bash tests/guacamole/guacd-bullseye.sh run PORT    # guacd -f on 127.0.0.1:PORT
#
# build: mmdebstrap (variant apt) of bullseye with guacd, libguac-client-vnc0 and
#   libguac-client-ssh0 into $EXOAGENT_GUACD_ROOT (default /var/tmp/exoagent-guacd-bullseye),
#   cached: ROOT/stamp holds the SHA-256 of this recipe, and a root whose stamp matches is
#   reused. The root is built next to it and moved into place only when complete, and it is
#   refused unless its guacd is 1.3.0 (docs and tests say "1.3.0"; a point release of bullseye
#   moving it would have to be looked at). Prints the root's path.
# run: builds when needed, then becomes `chroot ROOT /usr/sbin/guacd -b 127.0.0.1 -l PORT -f`
#   inside its own PID and mount namespaces (unshare): /proc and /dev/pts are mounted in the
#   namespace only, so no mount is left on the host whatever happens, and when the process
#   ends (SIGTERM, SIGINT or SIGKILL to the pid of this script) the kernel ends
#   guacd and every per-connection process it forked and drops the mounts. guacd shares the
#   host's network, so it reaches sshd and VNC servers on 127.0.0.1. guacd logs to stderr.
#
# Used by agent/tests/common (RealGuacd) and tests/browser/guacamole.test.mjs
# (EXOAGENT_GUACD=bullseye); see docs/testing.md.
set -euo pipefail

suite=bullseye
mirror=http://deb.debian.org/debian
packages=guacd,libguac-client-vnc0,libguac-client-ssh0
want_version=1.3.0
root=${EXOAGENT_GUACD_ROOT:-/var/tmp/exoagent-guacd-bullseye}
stamp_value=$(printf '%s\n' "recipe 1" "$suite" "$mirror" "$packages" "$want_version" | sha256sum | cut -d' ' -f1)

die() { echo "guacd-bullseye: $*" >&2; exit 1; }

build() {
  [ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap --mode=root, chroot)"
  mkdir -p "$(dirname "$root")"
  # One build at a time (tests may start guacd concurrently).
  exec 9>"$root.lock"
  flock 9
  if [ "$(cat "$root/stamp" 2>/dev/null || true)" = "$stamp_value" ] && [ -x "$root/usr/sbin/guacd" ]; then
    echo "$root"
    return
  fi
  if ! command -v mmdebstrap >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q >&2
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends mmdebstrap >&2
  fi
  local new="$root.new" started=$SECONDS
  rm -rf "$new"
  mmdebstrap --mode=root --variant=apt --include="$packages" \
    --customize-hook='rm -f "$1/etc/machine-id"; touch "$1/etc/machine-id"' \
    "$suite" "$new" "$mirror" >&2
  local got
  got=$(chroot "$new" dpkg-query -W -f='${Version}' guacd)
  case "$got" in
    "$want_version"-*) ;;
    *) rm -rf "$new"; die "bullseye's guacd is $got, not $want_version-*: look at what changed before using it" ;;
  esac
  echo "$stamp_value" > "$new/stamp"
  rm -rf "$root"
  mv "$new" "$root"
  echo "guacd-bullseye: built $root (guacd $got) in $((SECONDS - started)) s" >&2
  echo "$root"
}

case "${1:-}" in
  build)
    build
    ;;
  run)
    port=${2:-}
    [[ "$port" =~ ^[0-9]{1,5}$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "usage: run PORT (1-65535), saw ${port@Q}"
    build >/dev/null
    exec 9>&-  # the build lock: not held while guacd runs
    # unshare forks (PID namespace) and waits; --kill-child: when it ends, the namespace's
    # first process (guacd) gets SIGKILL, which ends the namespace. unshare itself ignores
    # SIGTERM while it waits, so this script stays the handle: SIGTERM/SIGINT/SIGHUP here kill
    # unshare, and if this script is SIGKILLed, setpriv's parent-death signal kills unshare.
    setpriv --pdeathsig KILL -- \
      unshare --pid --fork --kill-child --mount --propagation private -- \
      bash "$0" _inner "$port" &
    child=$!
    trap 'kill -KILL "$child" 2>/dev/null || true' TERM INT HUP EXIT
    status=0
    wait "$child" || status=$?
    exit "$status"
    ;;
  _inner)
    # PID 1 of the new namespaces; mounts here are invisible outside and die with them.
    port=$2
    mount -t proc proc "$root/proc"
    mount --bind /dev/pts "$root/dev/pts"
    exec chroot "$root" /usr/sbin/guacd -b 127.0.0.1 -l "$port" -f
    ;;
  *)
    die "usage: guacd-bullseye.sh build | run PORT"
    ;;
esac

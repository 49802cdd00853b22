#!/usr/bin/env bash
# Host tools for the VM harness on Debian 12: QEMU (from bookworm-backports, matching the
# machine's qemu-utils 10), mmdebstrap, genisoimage (config-drive ISOs), socat, and for the
# Exosphere scenario's extra disks lvm2 (pvcreate: a disk with an LVM signature) and fdisk
# (sfdisk: a disk with a partition table). Idempotent.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1; }
if have qemu-system-x86_64 && have mmdebstrap && have genisoimage && have socat \
    && have pvcreate && have sfdisk; then
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "tests/vm/prereqs.sh: run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
sources=/etc/apt/sources.list.d/exoagent-backports.sources
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat > "$sources" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
lock=(-o DPkg::Lock::Timeout=600)
apt-get "${lock[@]}" update -q
apt-get "${lock[@]}" install -y -q --no-install-recommends -t bookworm-backports \
  qemu-system-x86 qemu-utils
apt-get "${lock[@]}" install -y -q --no-install-recommends mmdebstrap genisoimage socat \
  e2fsprogs lvm2 fdisk

#!/usr/bin/env bash
# Build the VM test image: Debian 11, 12 or 13 (mmdebstrap, minbase) with systemd, cloud-init and
# exoagent installed from its .deb (installer/package/build.sh; apt-get installs it, its
# postinst enables the unit without starting it) and JupyterLab baked (`exoagent bake`), the
# host's CA bundle trusted (HTTPS here goes through an intercepting proxy). Writes
# OUT/root.raw (ext4, no partition table), OUT/vmlinuz, OUT/initrd.img.
#
#   bash tests/vm/build-image.sh OUT EXOAGENT_DEB [RELEASE]
#   bash tests/vm/build-image.sh OUT --stock [RELEASE]   # a plain Debian cloud image (benchmarks)
#
# RELEASE is bullseye (11), bookworm (12, the default) or trixie (13); every release is built
# the same way from the same package list (each release's own versions: bullseye's cloud-init
# 20.4 and Python 3.9, trixie's cloud-init 25.1 and Python 3.13), ifupdown + dhclient for the
# network as in Debian's cloud images up to 12.
#
# EXOAGENT_BAKE: the services `exoagent bake` pre-installs (space-separated; default
# "jupyterlab"), e.g. "jupyterlab desktop guacamole" for a web-desktop image.
#
# --stock mirrors Debian's genericcloud image: no exoagent, and none of what is baked below for
# the tests (python3-venv, python3-pip, the Exosphere base packages, git); python3 (cloud-init
# depends on it), curl, ca-certificates, sudo and cron are there, as in Debian's image. Like
# that image it has no apt lists (mmdebstrap's cleanup removes them): an apt step at boot
# starts with `apt-get update`. The host's CA bundle and pip.conf stay (the site's CA).
set -euo pipefail
usage="usage: build-image.sh OUT EXOAGENT_DEB|--stock [bullseye|bookworm|trixie]"
out=${1:?$usage}
variant=${2:?$usage}
release=${3:-bookworm}
case "$release" in
  bullseye|bookworm|trixie) ;;
  *) echo "build-image.sh: RELEASE: '$release' is not one of bullseye, bookworm, trixie" >&2
     exit 2 ;;
esac
bake=()
for service in ${EXOAGENT_BAKE:-jupyterlab}; do
  case "$service" in
    *[!a-z]*|"") echo "build-image.sh: EXOAGENT_BAKE: '$service' is not a service name" >&2
                 exit 2 ;;
  esac
  bake+=(--service "$service")
done
EXOAGENT_BAKE_ARGS=${bake[*]}
export EXOAGENT_BAKE_ARGS
agent_hooks=()
if [ "$variant" != "--stock" ]; then
  EXOAGENT_DEB=$(realpath "$2")
  export EXOAGENT_DEB
  # No systemd runs in the chroot: postinst creates the tmpfiles directories and the
  # multi-user.target.wants link, and starts nothing. Its dependencies are in the image already.
  agent_hooks=(
    --customize-hook='cp "$EXOAGENT_DEB" "$1/tmp/exoagent.deb"'
    --customize-hook='chroot "$1" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends /tmp/exoagent.deb'
    --customize-hook='rm -f "$1/tmp/exoagent.deb"'
    # Unquoted on purpose: words checked above (lowercase letters only), one per argument.
    --customize-hook='chroot "$1" /usr/bin/exoagent bake $EXOAGENT_BAKE_ARGS'
  )
fi
mkdir -p "$out"
out=$(realpath "$out")
rootfs="$out/rootfs"
rm -rf "$rootfs" "$out/root.raw"
packages=linux-image-cloud-amd64,systemd-sysv,udev,dbus,initramfs-tools,cloud-init,openssh-server
if [ "$variant" = "--stock" ]; then
  packages+=,ifupdown,isc-dhcp-client,iproute2,ca-certificates,curl,sudo,python3
  packages+=,locales,passwd,procps,cron
else
packages+=,ifupdown,isc-dhcp-client,iproute2,ca-certificates,curl,sudo,python3-venv,python3-pip
packages+=,locales,passwd,procps
# Exosphere's base-setup packages, which the agent installs for Exosphere's template only when
# missing: baked so the VM test's Exosphere scenario has no slow apt run under TCG.
packages+=,haveged,gnupg,cron,zip
# git, which the agent installs for a workflow when missing: baked for the same reason.
packages+=,git
fi
mmdebstrap --mode=root --variant=minbase --include="$packages" \
  --customize-hook='install -m 0644 /etc/ssl/certs/ca-certificates.crt "$1/usr/local/share/ca-certificates/build-host-bundle.crt"' \
  --customize-hook='chroot "$1" update-ca-certificates >/dev/null' \
  --customize-hook='printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" > "$1/etc/pip.conf"' \
  --customize-hook='sed -i "s/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/" "$1/etc/locale.gen" && chroot "$1" locale-gen >/dev/null' \
  "${agent_hooks[@]}" \
  --customize-hook='printf "source /etc/network/interfaces.d/*\nauto lo\niface lo inet loopback\n" > "$1/etc/network/interfaces"' \
  --customize-hook='rm -f "$1/etc/machine-id"; touch "$1/etc/machine-id"' \
  "$release" "$rootfs" http://deb.debian.org/debian
cp "$(ls "$rootfs"/boot/vmlinuz-* | tail -1)" "$out/vmlinuz"
cp "$(ls "$rootfs"/boot/initrd.img-* | tail -1)" "$out/initrd.img"
truncate -s 4G "$out/root.raw"
mkfs.ext4 -q -F -L rootfs -d "$rootfs" "$out/root.raw"
rm -rf "$rootfs"
echo "image ($release): $out/root.raw"

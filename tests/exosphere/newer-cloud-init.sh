#!/usr/bin/env bash
# Unpack (not install) Debian 13's cloud-init into DIR (default
# /var/tmp/exoagent-cloud-init-trixie), so the tests can check userdata against a current
# cloud-init's schema and merge rules as well as Debian 12's installed 22.4. Its modules run
# under /usr/bin/python3 with the installed cloud-init's dependencies. Prints DIR's
# dist-packages path. Idempotent.
set -euo pipefail
dir=${1:-${EXOAGENT_CLOUD_INIT_NEWER:-/var/tmp/exoagent-cloud-init-trixie}}
site="$dir/root/usr/lib/python3/dist-packages"
if [ ! -d "$site/cloudinit" ]; then
  mirror=http://deb.debian.org/debian
  mkdir -p "$dir"
  curl -fsS --retry 3 -o "$dir/Packages.xz" "$mirror/dists/trixie/main/binary-all/Packages.xz"
  filename=$(xz -dc "$dir/Packages.xz" \
    | awk '/^Package: /{p=($2=="cloud-init")} p && /^Filename: /{print $2}' | head -1)
  [ -n "$filename" ] || { echo "newer-cloud-init: cloud-init not found in trixie" >&2; exit 1; }
  curl -fsS --retry 3 -o "$dir/cloud-init.deb" "$mirror/$filename"
  rm -rf "$dir/root"
  dpkg-deb -x "$dir/cloud-init.deb" "$dir/root"
fi
echo "$site"

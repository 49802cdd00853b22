#!/usr/bin/env bash
# Installs what building, the sandbox and the tests need on a fresh Debian 12 machine.
# Idempotent: a second run installs nothing.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
have cargo || { echo "prereqs: cargo (rustup) is required" >&2; exit 1; }
have python3 || need_apt+=(python3)
have git || need_apt+=(git)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
have visudo || need_apt+=(sudo)
have useradd || need_apt+=(passwd)
have chpasswd || need_apt+=(passwd)
have pgrep || need_apt+=(procps)
have systemd-analyze || need_apt+=(systemd)   # to verify the shipped unit (not started)
have cloud-init || need_apt+=(cloud-init)      # `cloud-init schema` for the userdata (not run)
have xz || need_apt+=(xz-utils)
have curl || need_apt+=(curl)
have pamtester || need_apt+=(pamtester)  # RStudio's PAM sign-in stack, checked with a real PAM client
# RStudio's rpm signature check, tested with a throwaway key: rpmbuild, rpmsign, rpmkeys, gpg.
have rpmbuild || need_apt+=(rpm)
have gpg || need_apt+=(gpg)
have gpgconf || need_apt+=(gpgconf)
have gpg-agent || need_apt+=(gpg-agent)  # gpg needs its agent to make and use a secret key
# Volumes on loop devices (agent/tests/volumes.rs): the probes, mkfs, and what must be left alone.
have blkid || need_apt+=(util-linux)     # blkid, wipefs, losetup, partx, mount
have sfdisk || need_apt+=(fdisk)
have mkfs.ext4 || need_apt+=(e2fsprogs)
have pvcreate || need_apt+=(lvm2)
have genisoimage || need_apt+=(genisoimage)  # a real iso9660 config drive for the label reader's tests
# The packages (installer/package/build.sh, agent/tests/packages.rs): man renders the generated
# pages, strip the shipped binary, rpm (above) inspects and installs the .rpm into a scratch root.
have man || need_apt+=(man-db)
have strip || need_apt+=(binutils)
have unshare || need_apt+=(util-linux)
have dpkg-shlibdeps || need_apt+=(dpkg-dev)   # cargo-deb works out the .deb's Depends with it
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "prereqs: please install as root: apt-get install -y ${need_apt[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need_apt[@]}"
fi

# cargo-deny for the licence, ban and source checks (deny.toml), pinned; built from crates.io
# only when missing (~11 min on 2 cores), so a second run installs nothing.
CARGO_DENY_VERSION=0.20.2
if ! cargo deny --version 2>/dev/null | grep -qx "cargo-deny $CARGO_DENY_VERSION"; then
  cargo install --locked --version "$CARGO_DENY_VERSION" cargo-deny
fi

# The Guacamole client page, embedded into the binary at compile time.
bash "$(dirname "$0")/build-web.sh"

# A current cloud-init (Debian 13's), unpacked only, to check userdata against its schema too.
bash "$(dirname "$0")/../../tests/exosphere/newer-cloud-init.sh" >/dev/null

# uv makes the JupyterLab install take seconds instead of a minute; the agent falls back to pip
# without it, so a failure here is not fatal.
if ! have uv; then
  python3 -m pip install --quiet --disable-pip-version-check uv \
    || python3 -m pip install --quiet --disable-pip-version-check --user uv \
    || echo "prereqs: uv not installed; the agent will use pip" >&2
  # Under pyenv a newly installed executable appears on PATH only after a rehash.
  have uv || { have pyenv && pyenv rehash; } || true
fi

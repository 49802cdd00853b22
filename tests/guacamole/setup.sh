#!/usr/bin/env bash
# Installs what tests/guacamole/guacd_peer.py (the guacd test double) and its self-test
# test_peer.py need on Debian 12, as root. Idempotent: a second run installs nothing.
#
#   apt: TigerVNC (Xvnc, and vncpasswd from tigervnc-tools), a minimal Xfce session, xclip (the
#        self-test sets the desktop's clipboard with it), openssh-server (only the sshd
#        binary is used: the self-test runs its own sshd on its own loopback port with its own
#        config and host key; this script makes sure no system sshd is left running or enabled),
#        the DejaVu fonts the SSH renderer draws with, and python3-venv.
#   venv: ${EXOAGENT_GUAC_VENV:-/var/tmp/exoagent-guac-venv} with requirements.txt.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${EXOAGENT_GUAC_VENV:-/var/tmp/exoagent-guac-venv}"

if [ "$(id -u)" -ne 0 ]; then
  echo "guacamole setup: run as root" >&2
  exit 1
fi

pkgs=(tigervnc-standalone-server tigervnc-common tigervnc-tools xfce4 xfce4-terminal dbus-x11
      xclip x11-utils openssh-server fonts-dejavu-core python3-venv)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  ssh_was_installed=0
  dpkg-query -W -f='${Status}' openssh-server 2>/dev/null | grep -q '^install ok installed$' \
    && ssh_was_installed=1
  # Keep maintainer scripts from starting services (sshd above all) while installing: a
  # policy-rc.d that says 101 ("action forbidden"). One that already exists is left as it is.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  trap 'if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
  apt-get -o DPkg::Lock::Timeout=600 update -q
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
  if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; own_policy=0; fi
  # A system sshd that this script brought in must not listen nor start at boot.
  if [ "$ssh_was_installed" = 0 ]; then
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
      systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
    else
      # No systemd running: nothing was started (policy-rc.d); drop the boot-time links too.
      command -v deb-systemd-helper >/dev/null 2>&1 \
        && deb-systemd-helper disable ssh.service ssh.socket >/dev/null 2>&1 || true
      command -v update-rc.d >/dev/null 2>&1 && update-rc.d ssh disable >/dev/null 2>&1 || true
    fi
  fi
fi

# The venv: created once, then brought in line with requirements.txt (a no-op when it is).
if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3 -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  if command -v uv >/dev/null 2>&1; then
    uv pip install -q --python "$venv/bin/python" -r "$here/requirements.txt"
  else
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt"
  fi
  echo "$want" > "$stamp"
fi
echo "guacamole setup: ready (venv $venv)"

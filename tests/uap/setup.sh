#!/usr/bin/env bash
# Prepares the UAP tests (tests/uap/, tests/browser/uap.test.mjs) on Debian 12, as root.
# Idempotent: a second run installs nothing. Called by tests/browser/setup.sh.
#
#   apt:  nginx-light (Debian's nginx: the UAP), openssl (the CLI makes the throw-away
#         certificates), libnss3-tools (certutil: Chromium trusts the throw-away CA through an
#         NSS database under a private HOME), iproute2 (ss)
#
# Debian's nginx package starts a default site on 0.0.0.0:80 when it is installed on a machine
# running systemd. Nothing of the tests may listen outside loopback: a policy-rc.d forbids that
# start during the install (only when this script created it), and the unit is stopped and
# disabled afterwards. The tests start their own nginx with a private configuration.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "uap setup: run as root" >&2
  exit 1
fi

need=()
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v certutil >/dev/null 2>&1 || need+=(libnss3-tools)
command -v ss >/dev/null 2>&1 || need+=(iproute2)   # the test checks every listening socket is on loopback
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# tests/uap/setup.sh: no service starts while it installs nginx\nexit 101\n' > "$policy"
    chmod 0755 "$policy"
    made_policy=1
  fi
  trap '[ "$made_policy" = 1 ] && rm -f "$policy"' EXIT
  apt-get -o DPkg::Lock::Timeout=600 update -q
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}"
  if [ "$made_policy" = 1 ]; then rm -f "$policy"; made_policy=0; fi
fi
# Whatever happened before (an nginx installed some other way, a reboot): the distro's own
# nginx service must not be running on this machine's public addresses during the tests.
if [ -d /run/systemd/system ] && systemctl is-enabled nginx.service >/dev/null 2>&1; then
  systemctl disable --now nginx.service >/dev/null 2>&1 || true
fi
if [ -d /run/systemd/system ] && systemctl is-active nginx.service >/dev/null 2>&1; then
  systemctl stop nginx.service
fi
test -x /usr/sbin/nginx || { echo "uap setup: /usr/sbin/nginx is missing" >&2; exit 1; }
echo "uap setup: ready ($(/usr/sbin/nginx -v 2>&1); $(openssl version); certutil $(dpkg-query -W -f='${Version}' libnss3-tools))"

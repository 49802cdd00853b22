#!/usr/bin/env bash
# Prepares the browser tests (tests/browser/*.test.mjs) on Debian 12, as root.
# Idempotent: a second run installs and builds nothing.
#
#   apt:  chromium (Debian's package; the test drives /usr/bin/chromium through playwright-core,
#         which never downloads a browser of its own)
#   tests/guacamole/setup.sh: TigerVNC, Xfce, xclip, the sshd binary and the venv of the guacd
#         test double (see tests/guacamole/README.md)
#   tests/uap/setup.sh: nginx (the UAP), openssl, certutil (see tests/uap/README.md)
#   web:  the client page (installer/dev/build-web.sh → web/guacamole/dist, which exoagent
#         embeds at compile time; rebuild exoagent after it changes: cargo build -p exoagent)
#   npm:  playwright-core at the exact version of tests/browser/package-lock.json (npm ci)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

if [ "$(id -u)" -ne 0 ]; then
  echo "browser setup: run as root" >&2
  exit 1
fi

if ! dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q '^install ok installed$'; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q
  apt-get -o DPkg::Lock::Timeout=600 install -y -q chromium
fi
test -x /usr/bin/chromium || { echo "browser setup: /usr/bin/chromium is missing" >&2; exit 1; }

bash "$repo/tests/guacamole/setup.sh"
bash "$repo/tests/uap/setup.sh"
bash "$repo/installer/dev/build-web.sh"

# npm ci wipes and reinstalls node_modules; skip it when the lockfile has not changed since.
cd "$here"
stamp="node_modules/.package-lock.sha256"
want="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ ! -d node_modules/playwright-core ] || [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  npm ci --no-audit --no-fund --loglevel=error
  echo "$want" > "$stamp"
fi
echo "browser setup: ready ($(/usr/bin/chromium --version 2>/dev/null | head -1); playwright-core $(node -p 'require("./node_modules/playwright-core/package.json").version'))"

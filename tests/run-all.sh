#!/usr/bin/env bash
# The README's test command and exactly what CI runs: prerequisites, formatting, lints, the
# dependency policy (cargo-deny), real OpenStack on loopback, and every test (unit, integration
# with real processes, real JupyterLab and real OpenStack end to end, the Guacamole page in
# Chromium against a real desktop, and a real VM booting the baked image).
set -euo pipefail
cd "$(dirname "$0")/.."
bash installer/dev/prereqs.sh
# The one test that installs a real Debian package through the agent's apt layer.
export EXOAGENT_REAL_APT=1
# prereqs.sh built the Guacamole client page: a build that fell back to the not-built page fails.
export EXOAGENT_REQUIRE_CLIENT_PAGE=1
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# Licences, banned crates and sources (deny.toml). Offline: the advisory database lives on
# GitHub, which CI cannot reach. cargo-deny reads the metadata of every crate in the lock file,
# those of other platforms too (windows-sys, …), which the build never downloads: fetch them
# first from crates.io (a second or two), or a machine with a cold registry fails here.
cargo fetch --locked
cargo deny --offline check --hide-inclusion-graph licenses bans sources
# Real Keystone, Nova, Neutron, Glance and Placement (idempotent; ~1–2 min from nothing). A
# stack this run started is stopped again at the end; one already running is left alone.
started_openstack=0
if ! python3 tests/openstack/harness.py status >/dev/null 2>&1; then
  started_openstack=1
fi
if [ "$started_openstack" = 1 ]; then
  trap 'python3 tests/openstack/harness.py down >/dev/null 2>&1 || true' EXIT
fi
bash tests/openstack/up.sh
# TigerVNC, Xfce, an sshd binary and the venv of the guacd test double, Chromium for the
# browser tests, nginx for the UAP (tests/uap/setup.sh).
bash tests/browser/setup.sh
# A real guacd 1.3.0 (Debian 11's packages, what Ubuntu instances get) in a bullseye root, built
# once and cached under /var/tmp (~40 s the first time, nothing after): sandbox_guacamole's
# RealGuacd tests and the second browser run below use it.
bash tests/guacamole/guacd-bullseye.sh build
# The .deb and .rpm from the release binary (the VM test below reuses that build); the pinned
# packaging tools are built into ~/.cargo/bin the first time. agent/tests/packages.rs inspects
# these very files during the cargo test below (without the variable it builds them itself).
packages=$(bash installer/package/build.sh)
EXOAGENT_PACKAGES_DIR=$(dirname "$(head -n 1 <<<"$packages")")
export EXOAGENT_PACKAGES_DIR
# --include-ignored: the suites that need the OpenStack harness are ignored by a plain
# `cargo test` (docs/testing.md, "Fast loop"); here every test runs, none is skipped.
cargo test --workspace --all-targets -- --test-threads=2 --include-ignored
# JupyterLab on Debian 11's Python: the lock's 3.9 pins (JupyterLab 4.5) through the real agent
# (uv route), when this machine has a Python 3.9 (pyenv's here; ~45 s). Without one, said so.
# (pyenv's shims are no good: python3.9's fails unless 3.9 is the selected version.)
py39=
for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.9.*/bin/python3.9 /usr/bin/python3.9; do
  if "$candidate" -c 'import sys, venv; assert sys.version_info[:2] == (3, 9)' 2>/dev/null; then
    py39=$candidate
  fi
done
if [ -n "$py39" ]; then
  EXOAGENT_TEST_JUPYTERLAB_PYTHON=$py39 cargo test -p exoagent --test sandbox_jupyterlab sandbox_brings_up
else
  echo "run-all: no Python 3.9 here: JupyterLab's 3.9 pins not run (docs/testing.md)"
fi
# The client page's unit tests, the guacd double's own self-test against real sshd and
# TigerVNC, then Chromium against the real page, web side, sshd and desktop, and Chromium
# through a real UAP (nginx configured like Exosphere's, tests/uap/) to JupyterLab and the
# Guacamole shell, plain and through exoagent's TLS front (~45 s). One file at a time: both
# use the rig's user.
(cd web/guacamole && npm test --silent)
"${EXOAGENT_GUAC_VENV:-/var/tmp/exoagent-guac-venv}/bin/python" tests/guacamole/test_peer.py
node --test --test-concurrency=1 tests/browser/
# The Guacamole browser tests again, against the real guacd 1.3.0 instead of the double (~40 s):
# the same page, web side, sshd and desktop; the abort test needs this guacd and runs only here.
EXOAGENT_GUACD=bullseye EXOAGENT_TEST_ARTIFACTS=target/test-artifacts/guacd-1.3.0 \
  node --test --test-concurrency=1 tests/browser/guacamole.test.mjs
# A real VM (QEMU, software emulation) with real systemd and cloud-init booting the baked image
# as a server of the OpenStack harness (~5 min with the image build).
bash tests/vm/prereqs.sh
python3 tests/vm/vm_test.py

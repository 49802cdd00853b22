#!/usr/bin/env bash
# The README's test command and exactly what CI runs: prerequisites, formatting, lints, real
# OpenStack on loopback, and every test (unit, integration with real processes, real JupyterLab
# and real OpenStack end to end, and a real VM booting the baked image).
set -euo pipefail
cd "$(dirname "$0")/.."
bash installer/dev/prereqs.sh
# The one test that installs a real Debian package through the agent's apt layer.
export EXOAGENT_REAL_APT=1
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
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
cargo test --workspace --all-targets -- --test-threads=2
# A real VM (QEMU, software emulation) with real systemd and cloud-init booting the baked image
# as a server of the OpenStack harness (~5 min with the image build).
bash tests/vm/prereqs.sh
python3 tests/vm/vm_test.py

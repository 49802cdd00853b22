#!/usr/bin/env bash
# The README's test command and exactly what CI runs: prerequisites, formatting, lints, and
# every test (unit, integration with real processes, real JupyterLab end to end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash installer/dev/prereqs.sh
# The one test that installs a real Debian package through the agent's apt layer.
export EXOAGENT_REAL_APT=1
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --workspace --all-targets -- --test-threads=2

#!/usr/bin/env bash
# The README's "run" command: prerequisites, a release build, then the agent's main job in a
# sandbox directory (./exoagent-sandbox): JupyterLab on 127.0.0.1:8888, no root, no cloud.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash installer/dev/prereqs.sh
cargo build --release -p exoagent
exec target/release/exoagent sandbox "${1:-exoagent-sandbox}"

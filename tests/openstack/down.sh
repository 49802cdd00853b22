#!/usr/bin/env bash
# Stop the OpenStack test harness and forget its data (the venv is kept).
set -euo pipefail
exec python3 "$(dirname "$0")/harness.py" down

#!/usr/bin/env bash
# Start real OpenStack on loopback for the tests (idempotent; see harness.py).
set -euo pipefail
exec python3 "$(dirname "$0")/harness.py" up

#!/usr/bin/env bash
# Fuzz the Guacamole decoder for SECONDS (default 60), installing cargo-fuzz if missing.
# RUSTC_BOOTSTRAP=1 lets the stable toolchain accept the nightly-only flags cargo-fuzz passes.
set -euo pipefail

seconds="${1:-60}"
cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

mkdir -p corpus/guac_decoder
RUSTC_BOOTSTRAP=1 cargo fuzz run guac_decoder corpus/guac_decoder seeds/guac_decoder -- \
    -dict=guac.dict \
    -max_total_time="$seconds"

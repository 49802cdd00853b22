#!/usr/bin/env bash
# Builds exoagent's .deb and .rpm from the release binary (docs/operator-guide.md, "Packages").
# The packaging tools are pinned and installed into ~/.cargo/bin only when missing or at another
# version, so a CI machine builds them once. Prints the two package paths on stdout.
#
#   bash installer/package/build.sh            # → target/packages/exoagent_<v>-1_amd64.deb,
#                                               #   target/packages/exoagent-<v>-1.x86_64.rpm
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1

# cargo-<tool> at exactly this version, else install it (--locked: its own tested lockfile).
ensure_tool() {
  local tool=$1 version=$2
  if [ "$("cargo-$tool" --version 2>/dev/null)" != "cargo-$tool $version" ]; then
    echo "package: installing cargo-$tool $version" >&2
    cargo install --locked --version "$version" "cargo-$tool" >&2
  fi
}
ensure_tool deb "$CARGO_DEB_VERSION"
ensure_tool generate-rpm "$CARGO_GENERATE_RPM_VERSION"

# The same build the VM test uses, so CI compiles the release binary once.
cargo build --release -p exoagent >&2
target=$(cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
release="$target/release"
staging="$release/package-staging"
out="$target/packages"
rm -rf "$staging" "$out"
mkdir -p "$staging/completions" "$out"

# One stripped binary for both packages (cargo-generate-rpm does not strip).
strip -o "$staging/exoagent" "$release/exoagent"
# Man pages and completions from the binary's own clap definitions.
"$staging/exoagent" generate man --out "$staging/man" >/dev/null
for shell in bash zsh fish; do
  "$staging/exoagent" generate completions "$shell" --out "$staging/completions" >/dev/null
done
# -n: no name or timestamp in the gzip header, so the same pages give the same bytes.
gzip -9n "$staging"/man/*.1

# --no-build: the binary above is what ships; --no-strip: it is stripped already.
cargo deb -p exoagent --no-build --no-strip --output "$out/" >&2
cargo generate-rpm -p agent --target-dir "$target" --output "$out/" >&2

ls "$out"/*.deb "$out"/*.rpm

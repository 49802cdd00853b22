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
CARGO_ZIGBUILD_VERSION=0.24.1
ZIGLANG_VERSION=0.13.0
# The oldest glibc the packaged binary may need: EL 8's (2.28), below Debian 11's and Ubuntu
# 20.04's (2.31). A plain `cargo build` links against this machine's glibc (2.36) and needs
# 2.34, which those releases lack; zig's linker targets an older glibc's symbol versions.
GLIBC_FLOOR=2.28
TARGET=x86_64-unknown-linux-gnu

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
ensure_tool zigbuild "$CARGO_ZIGBUILD_VERSION"
# zig from PyPI (the ziglang wheel), pinned, in its own venv; cargo-zigbuild runs
# `python3 -m ziglang` when no zig is on PATH.
zig_venv=${EXOAGENT_ZIG_VENV:-/var/tmp/exoagent-zig}
if ! "$zig_venv/bin/python3" -m ziglang version 2>/dev/null | grep -qx "$ZIGLANG_VERSION"; then
  echo "package: installing ziglang $ZIGLANG_VERSION into $zig_venv" >&2
  python3 -m venv "$zig_venv" >&2
  "$zig_venv/bin/pip" install -q "ziglang==$ZIGLANG_VERSION" >&2
fi

# The same build the VM test uses (target/$TARGET/release/exoagent), so CI compiles the
# release binary once.
PATH="$zig_venv/bin:$PATH" cargo zigbuild --release -p exoagent --target "$TARGET.$GLIBC_FLOOR" >&2
target=$(cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
built="$target/$TARGET/release"
# Staged where the packages' asset lists expect it (agent/Cargo.toml: target/release/…, which
# both tools map to target/$TARGET/release/ with --target).
staging="$built/package-staging"
out="$target/packages"
rm -rf "$staging" "$out"
mkdir -p "$staging/completions" "$out"

# One stripped binary for both packages (cargo-generate-rpm does not strip).
strip -o "$staging/exoagent" "$built/exoagent"
# Man pages and completions from the binary's own clap definitions.
"$staging/exoagent" generate man --out "$staging/man" >/dev/null
for shell in bash zsh fish; do
  "$staging/exoagent" generate completions "$shell" --out "$staging/completions" >/dev/null
done
# -n: no name or timestamp in the gzip header, so the same pages give the same bytes.
gzip -9n "$staging"/man/*.1

# --no-build: the binary above is what ships; --no-strip: it is stripped already.
cargo deb -p exoagent --target "$TARGET" --no-build --no-strip --output "$out/" >&2
cargo generate-rpm -p agent --target "$TARGET" --target-dir "$target" --output "$out/" >&2

ls "$out"/*.deb "$out"/*.rpm

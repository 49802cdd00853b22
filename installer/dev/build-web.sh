#!/usr/bin/env bash
# Builds the Guacamole client page (web/guacamole/dist) from the npm lockfile; exoagent embeds
# it at compile time. Skips the build when dist is newer than every source file.
set -euo pipefail
cd "$(dirname "$0")/../../web/guacamole"
command -v npm >/dev/null || { echo "build-web: npm (Node.js) is required" >&2; exit 1; }
if [ -f dist/index.html ] && [ -z "$(find src build.mjs package.json package-lock.json -newer dist/index.html -print -quit)" ]; then
  exit 0
fi
npm ci --no-audit --no-fund --loglevel=error
npm run --silent build

#!/usr/bin/env bash
# Set up a test environment on a fresh machine and run the test suite against one ComfyUI host.
#   bash tools/test.sh [--host minimum|current] [pytest args...]
# minimum is ComfyUI v0.3.64 (the default), current is v0.33.0; .ci/run runs both.
# Without a ComfyUI host, the tests that need it are SKIPPED (not passed), with a loud line.
set -euo pipefail
if [ "${1:-}" = "--host" ]; then
  export PERFUSION_HOST="${2:?--host needs minimum or current}"
  shift 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$root"
exec "$venv/bin/python" -m pytest "$@"

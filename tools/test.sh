#!/usr/bin/env bash
# Set up a test environment on a fresh machine and run the test suite.
#   bash tools/test.sh [pytest args...]
# Without a ComfyUI host, the tests that need it are SKIPPED (not passed), with a loud line.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$root"
exec "$venv/bin/python" -m pytest "$@"

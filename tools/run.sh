#!/usr/bin/env bash
# Run the shipped workflows headless through ComfyUI's executor (see tools/run_workflow.py --help).
#   bash tools/run.sh                      # smoke run on a tiny built-in model: images are noise
#   bash tools/run.sh --checkpoint model.safetensors --images photos/ --name hugsy --superclass teddy
#   bash tools/run.sh --host current ...   # on ComfyUI v0.33.0 instead of the minimum, v0.3.64
# Sets up the same environment as tools/test.sh first. Inside your own ComfyUI's Python environment you
# can instead run: python tools/run_workflow.py --comfyui /path/to/ComfyUI ...
set -euo pipefail
if [ "${1:-}" = "--host" ]; then
  export PERFUSION_HOST="${2:?--host needs minimum or current}"
  shift 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ -z "${host:-}" ]; then
  echo "No ComfyUI to run on." >&2
  exit 2
fi
exec "$venv/bin/python" "$root/tools/run_workflow.py" --comfyui "$host" "$@"

#!/usr/bin/env bash
# Run the shipped workflows headless through ComfyUI's executor (see tools/run_workflow.py --help).
#   bash tools/run.sh                      # smoke run on a tiny built-in model: images are noise
#   bash tools/run.sh --checkpoint model.safetensors --images photos/ --name hugsy --superclass teddy
# Sets up the same environment as tools/test.sh first. Inside your own ComfyUI's Python environment you
# can instead run: python tools/run_workflow.py --comfyui /path/to/ComfyUI ...
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ -z "${COMFYUI_PATH:-}" ]; then
  echo "No ComfyUI to run on." >&2
  exit 2
fi
exec "$venv/bin/python" "$root/tools/run_workflow.py" --comfyui "$COMFYUI_PATH" "$@"

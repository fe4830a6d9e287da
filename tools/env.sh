# Sourced by tools/test.sh and tools/run.sh: the development environment and the ComfyUI host.
# - creates (or reuses) a virtual environment in the user cache with requirements-dev.txt;
# - finds the ComfyUI host (COMFYUI_PATH, the custom_nodes parent, or the cached v0.3.64 checkout,
#   cloning it when possible) and exports COMFYUI_PATH; without one, says so loudly.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-perfusion"
venv="${PERFUSION_VENV:-$cache/venv}"
python=${PYTHON:-$(command -v python3.11 || command -v python3)}

stamp=$(cat "$root/requirements.txt" "$root/requirements-dev.txt" | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating the environment in $venv (torch install takes about a minute)"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi
if [ "$(cat "$venv/.perfusion-stamp" 2>/dev/null)" != "$stamp" ]; then
  # New or changed requirements: installed on top, so a run in progress elsewhere keeps its environment.
  echo "[setup] installing requirements-dev.txt into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$root/requirements-dev.txt"
  echo "$stamp" > "$venv/.perfusion-stamp"
fi

if host=$("$venv/bin/python" "$root/tools/comfy_host.py" --provide); then
  export COMFYUI_PATH="$host"
  echo "[setup] ComfyUI host: $COMFYUI_PATH"
else
  unset COMFYUI_PATH
  echo "[setup] WARNING: no ComfyUI host found (see the message above)."
fi

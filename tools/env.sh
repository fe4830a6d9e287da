# Sourced by tools/test.sh and tools/run.sh: the development environment of one ComfyUI host.
# - PERFUSION_HOST picks the host: minimum (ComfyUI v0.3.64, the default) or current (v0.33.0); see
#   support/comfy_host.py for where each is found (COMFYUI_PATH / COMFYUI_CURRENT_PATH or the user cache).
# - each host has its own virtual environment in the user cache: requirements-dev.txt plus what that host
#   needs (tools/requirements-v0.3.64.txt, or the current host's own requirements.txt with its frontend,
#   comfy-kitchen and comfy-aimdo), with torch held at tools/constraints.txt.
# Exports PERFUSION_HOST and the host's path variable (COMFYUI_PATH or COMFYUI_CURRENT_PATH); without a host,
# says so loudly.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-perfusion"
export PERFUSION_HOST="${PERFUSION_HOST:-minimum}"
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
case "$PERFUSION_HOST" in
  minimum) venv="${PERFUSION_VENV:-$cache/venv}" ;;
  current) venv="${PERFUSION_CURRENT_VENV:-$cache/venv-v0.33.0}" ;;
  *) echo "[setup] PERFUSION_HOST must be minimum or current, not '$PERFUSION_HOST'" >&2; return 2 2>/dev/null || exit 2 ;;
esac

if host=$("$python" "$root/support/comfy_host.py" --provide); then
  host_requirements=$("$python" "$root/support/comfy_host.py" --requirements)
else
  host=""
  host_requirements=""
fi

stamp=$(cat "$root/requirements.txt" "$root/requirements-dev.txt" "$root/tools/constraints.txt" ${host_requirements:+"$host_requirements"} | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating the $PERFUSION_HOST host's environment in $venv (torch install takes about a minute)"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi
if [ "$(cat "$venv/.perfusion-stamp" 2>/dev/null)" != "$stamp" ]; then
  # New or changed requirements: installed on top, so a run in progress elsewhere keeps its environment.
  echo "[setup] installing requirements-dev.txt ${host_requirements:+and $host_requirements }into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$root/tools/constraints.txt" \
    -r "$root/requirements-dev.txt" ${host_requirements:+-r "$host_requirements"}
  echo "$stamp" > "$venv/.perfusion-stamp"
fi

path_variable=$([ "$PERFUSION_HOST" = current ] && echo COMFYUI_CURRENT_PATH || echo COMFYUI_PATH)
if [ -n "$host" ]; then
  export "$path_variable=$host"
  echo "[setup] ComfyUI host ($PERFUSION_HOST): $host"
else
  unset "$path_variable"
  echo "[setup] WARNING: no ComfyUI host found for PERFUSION_HOST=$PERFUSION_HOST (see the message above)."
fi

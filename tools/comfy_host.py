"""Find (and, where possible, provide) the ComfyUI checkout that hosts the pack in tests.

Search order (DESIGN.md §5):
  1. the ``COMFYUI_PATH`` environment variable;
  2. the ComfyUI folder above ``custom_nodes/`` when the pack is installed there;
  3. the user cache, ``${XDG_CACHE_HOME:-~/.cache}/comfyui-perfusion/ComfyUI-v0.3.64``.

``python tools/comfy_host.py --provide`` clones the pinned release into the cache when none is found.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

COMFYUI_TAG = "v0.3.64"
COMFYUI_REPO = "https://github.com/Comfy-Org/ComfyUI.git"
PACK_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comfyui-perfusion"


def cached_checkout() -> Path:
    return cache_dir() / f"ComfyUI-{COMFYUI_TAG}"


def is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "nodes.py").is_file()


def find_comfyui(pack_root: Path = PACK_ROOT) -> Path | None:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).resolve() if is_comfyui(Path(env)) else None
    if pack_root.parent.name == "custom_nodes" and is_comfyui(pack_root.parent.parent):
        return pack_root.parent.parent
    if is_comfyui(cached_checkout()):
        return cached_checkout()
    return None


HOW_TO_PROVIDE = f"""\
No ComfyUI checkout was found and none could be cloned. Provide one in any of these ways:
  * export COMFYUI_PATH=/path/to/ComfyUI   (a checkout of Comfy-Org/ComfyUI {COMFYUI_TAG});
  * install this pack into <ComfyUI>/custom_nodes/ and run the tests from there;
  * put a checkout at {cached_checkout()}:
      git clone --depth 1 --branch {COMFYUI_TAG} {COMFYUI_REPO} {cached_checkout()}
    or, from a bare git copy of the repository (no network needed):
      ../shared/tools/snapshot-checkout <git dir> {cached_checkout()}"""


def provide_comfyui() -> Path | None:
    found = find_comfyui()
    if found is not None or os.environ.get("COMFYUI_PATH"):
        return found
    target = cached_checkout()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    cmd = ["git", "clone", "--quiet", "--depth", "1", "--branch", COMFYUI_TAG, COMFYUI_REPO, str(partial)]
    try:
        subprocess.run(["rm", "-rf", str(partial)], check=True)
        subprocess.run(cmd, check=True, timeout=300, stdin=subprocess.DEVNULL,
                       env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
        partial.rename(target)
    except (OSError, subprocess.SubprocessError):
        subprocess.run(["rm", "-rf", str(partial)])
        return None
    return target if is_comfyui(target) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--provide", action="store_true", help="clone the pinned release into the cache if missing")
    args = parser.parse_args()
    host = provide_comfyui() if args.provide else find_comfyui()
    if host is None:
        sys.stderr.write(HOW_TO_PROVIDE + "\n")
        return 1
    sys.stdout.write(f"{host}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

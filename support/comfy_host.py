"""Find (and, where possible, provide) the ComfyUI checkouts that host the pack in tests, and boot one.

Two hosts are supported and tested (README, "Supported ComfyUI versions"):

| host      | release | found through                                                                      |
|-----------|---------|------------------------------------------------------------------------------------|
| `minimum` | v0.3.64 | `COMFYUI_PATH`; the ComfyUI above `custom_nodes/`; `<cache>/ComfyUI-v0.3.64`        |
| `current` | v0.33.0 | `COMFYUI_CURRENT_PATH`; `<cache>/ComfyUI-v0.33.0`                                   |

`<cache>` is `${XDG_CACHE_HOME:-~/.cache}/comfyui-perfusion`.

    python support/comfy_host.py [--host minimum|current] [--provide]

prints the checkout's path; `--provide` clones the pinned release into the cache when none is found.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Host:
    name: str
    tag: str
    path_variable: str
    repository: str
    # What the host's environment installs on top of requirements-dev.txt: a file of the pack's (relative to
    # the pack) or, when None, the host's own requirements.txt (its frontend, comfy-kitchen, comfy-aimdo...).
    requirements: str | None


HOSTS = {
    "minimum": Host("minimum", "v0.3.64", "COMFYUI_PATH", "https://github.com/Comfy-Org/ComfyUI.git",
                    "tools/requirements-v0.3.64.txt"),
    "current": Host("current", "v0.33.0", "COMFYUI_CURRENT_PATH", "https://github.com/Comfy-Org/ComfyUI.git",
                    None),
}
DEFAULT_HOST = "minimum"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comfyui-perfusion"


def cached_checkout(host: Host) -> Path:
    return cache_dir() / f"ComfyUI-{host.tag}"


def is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "nodes.py").is_file()


def selected_host() -> Host:
    """The host named by PERFUSION_HOST (tools/env.sh sets it), else the minimum one."""
    name = os.environ.get("PERFUSION_HOST", DEFAULT_HOST)
    if name not in HOSTS:
        raise SystemExit(f"PERFUSION_HOST={name!r}: expected one of {sorted(HOSTS)}")
    return HOSTS[name]


def find_comfyui(pack_root: Path = PACK_ROOT, host: Host | None = None) -> Path | None:
    host = host or selected_host()
    env = os.environ.get(host.path_variable)
    if env:
        return Path(env).resolve() if is_comfyui(Path(env)) else None
    if host.name == DEFAULT_HOST and pack_root.parent.name == "custom_nodes" and is_comfyui(pack_root.parent.parent):
        return pack_root.parent.parent
    if is_comfyui(cached_checkout(host)):
        return cached_checkout(host)
    return None


def required_comfyui(pack_root: Path = PACK_ROOT) -> Path:
    """find_comfyui() for the selected host, or a SystemExit that says how to provide it."""
    host = selected_host()
    found = find_comfyui(pack_root, host)
    if found is None:
        raise SystemExit(f"No ComfyUI {host.tag} checkout found: `bash tools/test.sh --host {host.name}` provides "
                         f"one, or set {host.path_variable}=/path/to/ComfyUI.")
    return found


def how_to_provide(host: Host) -> str:
    return f"""\
No ComfyUI {host.tag} checkout was found and none could be cloned. Provide one in any of these ways:
  * export {host.path_variable}=/path/to/ComfyUI   (a checkout of ComfyUI {host.tag});
  * put a checkout at {cached_checkout(host)}:
      git clone --depth 1 --branch {host.tag} {host.repository} {cached_checkout(host)}
    or, from a bare git copy of the repository (no network needed):
      mkdir -p {cached_checkout(host)} && git --git-dir=<git dir> archive {host.tag} | tar -x -C {cached_checkout(host)}"""


def provide_comfyui(host: Host) -> Path | None:
    found = find_comfyui(host=host)
    if found is not None or os.environ.get(host.path_variable):
        return found
    target = cached_checkout(host)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    cmd = ["git", "clone", "--quiet", "--depth", "1", "--branch", host.tag, host.repository, str(partial)]
    try:
        subprocess.run(["rm", "-rf", str(partial)], check=True)
        subprocess.run(cmd, check=True, timeout=300, stdin=subprocess.DEVNULL,
                       env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
        partial.rename(target)
    except (OSError, subprocess.SubprocessError):
        subprocess.run(["rm", "-rf", str(partial)])
        return None
    return target if is_comfyui(target) else None


def requirements_file(host: Host, path: Path) -> Path:
    return PACK_ROOT / host.requirements if host.requirements else path / "requirements.txt"


def comfyui_version(path: Path) -> str:
    """The version a checkout declares in comfyui_version.py ("unknown" if none)."""
    try:
        text = (path / "comfyui_version.py").read_text()
    except OSError:
        return "unknown"
    return text.split("__version__")[-1].split('"')[1] if '__version__' in text else "unknown"


def prepare(path: Path, cpu: bool = True, fp32_text_encoder: bool = False) -> Path:
    """Make the ComfyUI checkout at `path` importable, with the settings ComfyUI reads when
    comfy.model_management is first imported (the device, the text encoder's dtype) made before that import."""
    path = Path(path).resolve()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu
    if fp32_text_encoder:
        comfy.cli_args.args.fp32_text_enc = True  # ComfyUI's CPU default, float16, is several times slower
    return path


def boot(path: Path, cpu: bool = True, fp32_text_encoder: bool = False, load_pack: bool = True):
    """Import ComfyUI as a library with its built-in nodes and (optionally) load this pack through ComfyUI's own
    custom-node loader. Returns the pack module as ComfyUI loaded it (None without `load_pack`).

    The one boot sequence of tests, tools, benchmarks and experiments."""
    import logging
    prepare(path, cpu, fp32_text_encoder)
    import utils.install_util  # noqa: F401  (as main.py does: before nodes.py puts comfy/ first on sys.path)
    import nodes
    level = logging.getLogger().level
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    logging.getLogger().setLevel(level)
    if not load_pack:
        return None
    if not asyncio.run(nodes.load_custom_node(str(PACK_ROOT), module_parent="custom_nodes")):
        raise RuntimeError("ComfyUI's custom-node loader failed to load the pack; see the log above.")
    return sys.modules[str(PACK_ROOT).replace(".", "_x_")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", choices=sorted(HOSTS), default=None,
                        help="which host (default: PERFUSION_HOST, else minimum)")
    parser.add_argument("--provide", action="store_true", help="clone the pinned release into the cache if missing")
    parser.add_argument("--requirements", action="store_true",
                        help="print the requirements file the host's environment installs, not the host's path")
    args = parser.parse_args()
    host = HOSTS[args.host] if args.host else selected_host()
    path = provide_comfyui(host) if args.provide else find_comfyui(host=host)
    if path is None:
        sys.stderr.write(how_to_provide(host) + "\n")
        return 1
    sys.stdout.write(f"{requirements_file(host, path) if args.requirements else path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

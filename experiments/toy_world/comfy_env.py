"""Boot ComfyUI in-process on the CPU and load the pack through ComfyUI's own custom-node loader (as tests do)."""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_booted = {}


def host_path() -> Path:
    spec = importlib.util.spec_from_file_location("comfy_host", REPO / "tools" / "comfy_host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    host = module.find_comfyui(REPO)
    if host is None:
        raise SystemExit("No ComfyUI host found: set COMFYUI_PATH or run `bash tools/test.sh` once (see README).")
    return host


def import_comfy() -> Path:
    """ComfyUI importable, forced to the CPU (before comfy.model_management is imported)."""
    if "host" not in _booted:
        host = host_path()
        sys.path.insert(0, str(host))
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        # ComfyUI's CPU default is a float16 text encoder, about 3.5x slower here than float32; concept
        # training backpropagates through all of CLIP-L (the runner and the server tests do the same)
        comfy.cli_args.args.fp32_text_enc = True
        _booted["host"] = host
    return _booted["host"]


def boot_with_pack():
    """ComfyUI's nodes plus this pack, loaded by ComfyUI. Returns the pack module."""
    if "pack" in _booted:
        return _booted["pack"]
    import_comfy()
    import nodes
    level = logging.getLogger().level
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(REPO), module_parent="custom_nodes")):
        raise RuntimeError("ComfyUI failed to load the pack; see the log above.")
    logging.getLogger().setLevel(level)
    _booted["pack"] = sys.modules[str(REPO).replace(".", "_x_")]
    return _booted["pack"]

"""Boot ComfyUI in-process on the CPU and load the pack through ComfyUI's own custom-node loader (as tests do)."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.append(str(REPO))  # after ComfyUI (support/__init__.py says why)
from support import comfy_host  # noqa: E402
_booted = {}


def host_path() -> Path:
    return comfy_host.required_comfyui(REPO)


def import_comfy() -> Path:
    """ComfyUI importable on the CPU, its text encoder in float32 (see boot_with_pack), without its nodes."""
    return comfy_host.prepare(host_path(), cpu=True, fp32_text_encoder=True)


def boot_with_pack():
    """ComfyUI on the CPU with its nodes plus this pack, loaded by ComfyUI. Returns the pack module.
    ComfyUI's CPU default is a float16 text encoder, about 3.5x slower here than float32; concept training
    backpropagates through all of CLIP-L, so the text encoder runs in float32."""
    if "pack" not in _booted:
        _booted["pack"] = comfy_host.boot(host_path(), cpu=True, fp32_text_encoder=True)
    return _booted["pack"]

"""Expensive artefacts live in ~/.cache/comfyui-perfusion/toy_world/<stage>-<hash of their config>/."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comfyui-perfusion" / "toy_world"


def key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def folder(stage: str, config: dict) -> Path:
    path = root() / f"{stage}-{key(config)}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, sort_keys=True, indent=1, default=str))
    return path

"""What the pack's nodes share: the PERFUSION_CONCEPT socket type and the models/perfusion folder."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

PerfusionConcept = io.Custom("PERFUSION_CONCEPT")
CONCEPT_FOLDER = "perfusion"
COVARIANCE_FOLDER = "perfusion_covariance"
CATEGORY = "perfusion"


def register_folder(name: str) -> None:
    """Add models/<name>, keeping any folders extra_model_paths.yaml already registered for it."""
    default = os.path.join(folder_paths.models_dir, name)
    paths = list(folder_paths.folder_names_and_paths.get(name, ([], set()))[0])
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[name] = (paths, {".safetensors"})


def register_concept_folder() -> None:
    register_folder(CONCEPT_FOLDER)
    register_folder(COVARIANCE_FOLDER)

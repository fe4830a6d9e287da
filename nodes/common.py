"""What the pack's nodes share: the PERFUSION_CONCEPT socket type and the models/perfusion folder."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

PerfusionConcept = io.Custom("PERFUSION_CONCEPT")
CONCEPT_FOLDER = "perfusion"
CATEGORY = "perfusion"


def register_concept_folder() -> None:
    """Add models/perfusion, keeping any folders extra_model_paths.yaml already registered."""
    default = os.path.join(folder_paths.models_dir, CONCEPT_FOLDER)
    paths = list(folder_paths.folder_names_and_paths.get(CONCEPT_FOLDER, ([], set()))[0])
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[CONCEPT_FOLDER] = (paths, {".safetensors"})

"""What the pack's nodes share: the PERFUSION_CONCEPT socket type, the models/perfusion folder and saving into it."""
from __future__ import annotations

import dataclasses
import os
import re

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


def next_free_path(folder: str, filename_prefix: str) -> str:
    """`<folder>/<prefix>_00001.safetensors`, the next free counter; the prefix may name sub-folders."""
    prefix = filename_prefix.strip().replace("\\", "/")
    if not prefix or prefix.startswith("/") or ".." in prefix.split("/"):
        raise ValueError(f"filename_prefix '{filename_prefix}' must be a relative name inside models/perfusion.")
    directory = os.path.join(folder, os.path.dirname(prefix))
    base = os.path.basename(prefix)
    os.makedirs(directory, exist_ok=True)
    pattern = re.compile(re.escape(base) + r"_(\d{5})\.safetensors$")
    used = [int(m.group(1)) for f in os.listdir(directory) if (m := pattern.match(f))]
    return os.path.join(directory, f"{base}_{max(used, default=0) + 1:05d}.safetensors")


def save_concept(concept, folder: str, filename_prefix: str) -> str:
    """Write `concept` to next_free_path(folder, filename_prefix); returns the path."""
    from ..perfusion_ops.concept_file import write_concept
    path = next_free_path(folder, filename_prefix)
    write_concept(concept, path)
    return path


# Newer hosts (v0.33.0, not v0.3.64) let a node name search aliases and mark inputs 'advanced' (shown when the
# user expands the node). On hosts without them the nodes look as before.
SCHEMA_HAS_SEARCH_ALIASES = "search_aliases" in {field.name for field in dataclasses.fields(io.Schema)}
INPUTS_HAVE_ADVANCED = "advanced" in io.Input.__init__.__code__.co_varnames


def with_search_aliases(aliases: list[str]) -> dict:
    """io.Schema keyword arguments that give the node these search aliases, where the host supports them."""
    return {"search_aliases": aliases} if SCHEMA_HAS_SEARCH_ALIASES else {}


def advanced(node_input):
    """`node_input`, marked advanced where the host supports it: the editor folds it away until asked."""
    if INPUTS_HAVE_ADVANCED:
        node_input.advanced = True
    return node_input

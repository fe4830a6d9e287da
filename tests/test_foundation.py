"""The pack loads through ComfyUI's loader; tiny models sample; the in-process executor runs graphs."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from support.tiny_models import ARCHS, sample, tiny_clip, tiny_model

NODE_IDS = {"PerfusionLoadConcept", "PerfusionSaveConcept", "PerfusionApplyConcept", "PerfusionCombineConcepts",
            "PerfusionTrainConcept", "PerfusionLoadPhotos", "PerfusionGateSweep"}  # every node of the pack (checked below)


@pytest.mark.host
def test_pack_registers_its_nodes_through_comfyui_loader(pack):
    import nodes
    assert pack is not None and hasattr(pack, "comfy_entrypoint")
    registered = {node_id for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items() if cls.__module__.startswith(pack.__name__)}
    assert registered == NODE_IDS, "every node of the pack is checked here, and only those"
    for node_id in NODE_IDS:
        schema = nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        assert schema.description, node_id
        for i in schema.inputs:
            assert i.tooltip, f"{node_id}.{i.id} has no tooltip"
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("Perfusion ")


@pytest.mark.host
def test_concept_folder_is_registered_keeping_existing_paths():
    import folder_paths
    paths, extensions = folder_paths.folder_names_and_paths["perfusion"]
    assert os.path.join(folder_paths.models_dir, "perfusion") in paths
    assert extensions == {".safetensors"}


@pytest.mark.host
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_sample_two_steps_to_finite_latents(arch):
    model, clip = tiny_model(arch), tiny_clip(arch)
    latent = sample(model, clip, "a photo of a teddy", steps=2)
    assert latent.shape == (1, 4, 16, 16)
    assert torch.isfinite(latent).all() and latent.abs().sum() > 0


@pytest.mark.host
def test_executor_runs_a_graph_of_stock_nodes():
    from support.comfy_runner import run_prompt
    from support.tiny_models import register_test_nodes
    register_test_nodes()
    prompt = {
        "1": {"class_type": "PerfusionTestTinyCheckpoint", "inputs": {"arch": "sd1", "seed": 0, "weight_std": 0.02}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a teddy"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    executor, outputs = run_prompt(prompt)
    assert outputs["7"]["images"], "PreviewImage produced no image"


def test_perfusion_ops_imports_without_comfyui():
    """`perfusion_ops` must import in a Python that has no ComfyUI on its path."""
    code = ("import sys, pkgutil, importlib; sys.path.insert(0, '.');"
            "import perfusion_ops;"
            "[importlib.import_module('perfusion_ops.' + m.name) for m in pkgutil.iter_modules(perfusion_ops.__path__)];"
            "assert not any(k == 'comfy' or k.startswith('comfy.') for k in sys.modules), 'imported comfy'")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.host
def test_pyproject_is_a_valid_registry_file_for_comfyui():
    """ComfyUI parses pyproject.toml with its own registry model when it loads the pack."""
    import tomllib
    from comfy_config import config_parser
    config = config_parser.extract_node_configuration(str(REPO))
    assert config.project.name == "perfusion" and config.project.version.count(".") == 2
    assert config.project.license.file == "LICENSE" and (REPO / "LICENSE").is_file()
    assert config.tool_comfy.publisher_id and config.tool_comfy.display_name == "Perfusion"
    raw = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert raw["tool"]["comfy"]["requires-comfyui"].startswith(">=0.3.64")
    # Run-time requirements stay minimal and never reinstall torch into a user's ComfyUI.
    requirements = [line.split(">")[0].split("=")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert requirements == ["safetensors", "einops"]

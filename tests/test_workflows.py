"""The shipped workflows: editor format, up to date with the nodes, and executed by ComfyUI's executor.

Each file in workflows/ is converted to the API form (support/workflow_api.py) and run in-process on tiny
models: the stock checkpoint loader is swapped for the test-only tiny loader (same MODEL, CLIP, VAE
outputs), everything else runs as shipped, with fewer steps and small images. The README's headless
command is run as written, on a fresh output folder.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from support.tiny_models import register_test_nodes
from support.workflow_api import WorkflowError, nodes_of_type, object_info_in_process, ui_to_api, widget_values_by_name

pytestmark = pytest.mark.host

WORKFLOWS = REPO / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.json"))
TRAIN, GENERATE, TWO = "perfusion_train_concept.json", "perfusion_generate.json", "perfusion_two_concepts.json"
SWEEP, AUTO_MASKS = "perfusion_gate_sweep.json", "perfusion_train_auto_masks.json"


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def to_api(workflow: dict) -> dict:
    return ui_to_api(workflow, object_info_in_process({node["type"] for node in workflow["nodes"]}))


def test_the_workflows_ship():
    from support import shipped_workflows
    assert {TRAIN, GENERATE, TWO, SWEEP, AUTO_MASKS} == {path.name for path in WORKFLOW_FILES} \
        == set(shipped_workflows.BUILDERS)


def _without_unlinked_outputs(workflow: dict) -> dict:
    """The workflow with the output lists of nodes none of whose outputs is linked emptied: v0.33.0's SaveImage
    declares an IMAGE output that v0.3.64's does not, and the editor of either host adds or drops such unlinked
    slots when it loads a workflow."""
    workflow = copy.deepcopy(workflow)
    for node in workflow["nodes"]:
        if not any(output["links"] for output in node["outputs"]):
            node["outputs"] = []
    return workflow


def test_workflow_files_are_what_make_workflows_writes_for_the_current_nodes():
    """A node input added without regenerating the workflows fails here: run tools/make_workflows.py with the
    minimum host (tools/test.sh's default). The files are written from v0.3.64's node definitions; on v0.33.0
    they must equal what it writes up to the unlinked output slots of sink nodes."""
    from conftest import HOST_NAME
    from support import shipped_workflows
    info = shipped_workflows.node_definitions()
    buildable = shipped_workflows.buildable(info)
    # SAM3 is in the current host only: the minimum host cannot build its workflow (nor load it in the editor).
    assert set(shipped_workflows.BUILDERS) - set(buildable) == ({AUTO_MASKS} if HOST_NAME == "minimum" else set())
    for filename, build in buildable.items():
        shipped = json.loads((WORKFLOWS / filename).read_text())
        written = json.loads(json.dumps(build(info)))
        if HOST_NAME == "minimum" or filename in shipped_workflows.NEEDS_SAM3:
            assert shipped == written, f"{filename} is stale: run tools/make_workflows.py"
        else:
            assert _without_unlinked_outputs(shipped) == _without_unlinked_outputs(written), \
                f"{filename} is stale for the {HOST_NAME} host: run tools/make_workflows.py"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_is_a_consistent_editor_graph_of_known_nodes_with_notes(path):
    import nodes
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    by_id = {node["id"]: node for node in workflow["nodes"]}
    assert len(by_id) == len(workflow["nodes"])
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        assert link_id in by_id[origin]["outputs"][origin_slot]["links"]
        assert by_id[target]["inputs"][target_slot]["link"] == link_id
        assert kind == by_id[origin]["outputs"][origin_slot]["type"]
    from support.shipped_workflows import SAM3_NODES
    for node in workflow["nodes"]:
        known = node["type"] == "Note" or node["type"] in nodes.NODE_CLASS_MAPPINGS
        assert known or (node["type"] in SAM3_NODES and node["type"] not in nodes.NODE_CLASS_MAPPINGS), node["type"]
    notes = [node for node in workflow["nodes"] if node["type"] == "Note"]
    assert notes and all(len(note["widgets_values"][0]) > 100 for note in notes)
    # The user must choose the checkpoint: a note says so.
    assert any("checkpoint" in note["widgets_values"][0].lower() for note in notes)


def test_conversion_follows_the_editor_seed_control_muted_nodes_and_links():
    workflow = load(TRAIN)
    prompt = to_api(workflow)
    train = nodes_of_type(prompt, "PerfusionTrainConcept")[0]["inputs"]
    # "fixed", the seed's control value, is not sent and does not shift the inputs after it.
    assert train["seed"] == 0 and train["batch_size"] == 4 and train["resolution"] == 512
    assert "fixed" not in train.values()
    assert isinstance(train["model"], list) and len(train["model"]) == 2
    photos = next(key for key, node in prompt.items() if node["class_type"] == "PerfusionLoadPhotos")
    assert train["images"] == [photos, 0] and train["masks"] == [photos, 1]
    assert all(node["class_type"] != "Note" for node in prompt.values())
    # A muted node is left out, and so are the links from it.
    muted = copy.deepcopy(workflow)
    for node in muted["nodes"]:
        if node["type"] == "PerfusionLoadPhotos":
            node["mode"] = 2
    converted = to_api(muted)
    train = nodes_of_type(converted, "PerfusionTrainConcept")[0]["inputs"]
    assert not nodes_of_type(converted, "PerfusionLoadPhotos") and "masks" not in train and "images" not in train


def test_conversion_gives_defaults_to_inputs_added_after_a_workflow_was_saved_and_refuses_extra_values():
    workflow = load(TRAIN)
    node = next(n for n in workflow["nodes"] if n["type"] == "PerfusionTrainConcept")
    info = object_info_in_process(["PerfusionTrainConcept"])["PerfusionTrainConcept"]
    old = dict(node, widgets_values=node["widgets_values"][:-2])  # as saved before the last two inputs existed
    values = widget_values_by_name(old, info)
    assert values["name"] == "my_concept" and len(values) == len(widget_values_by_name(node, info)) - 2
    with pytest.raises(WorkflowError, match="widget values"):
        widget_values_by_name(dict(node, widgets_values=node["widgets_values"] + [1]), info)
    with pytest.raises(WorkflowError, match="superclass"):
        widget_values_by_name(dict(node, widgets_values=node["widgets_values"][:1]), info)


def _on_tiny_models(prompt: dict, **train_inputs) -> dict:
    """The prompt with the stock checkpoint loader swapped for the tiny one, few steps and small images."""
    for node in nodes_of_type(prompt, "CheckpointLoaderSimple"):
        node["class_type"] = "PerfusionTestTinyCheckpoint"
        node["inputs"] = {"arch": "sd1", "seed": 0, "weight_std": 0.02}
    for node in nodes_of_type(prompt, "PerfusionTrainConcept"):
        node["inputs"].update({"steps": 2, "resolution": 64, "batch_size": 2, "gradient_accumulation": 1,
                               "validate_every": 1, "validation_steps": 2, **train_inputs})
    for node in nodes_of_type(prompt, "KSampler") + nodes_of_type(prompt, "PerfusionGateSweep"):
        node["inputs"]["steps"] = 2
    for node in nodes_of_type(prompt, "EmptyLatentImage"):
        node["inputs"]["width"] = node["inputs"]["height"] = 64
    return prompt


@pytest.fixture
def photo_folder(tmp_path, monkeypatch):
    """input/my_concept/ with four small photos and input/my_concept/mask/ with their masks."""
    import folder_paths
    from PIL import Image
    input_dir = tmp_path / "input"
    (input_dir / "my_concept" / "mask").mkdir(parents=True)
    for index in range(4):
        Image.new("RGB", (48, 48), (40 * index, 100, 200 - 40 * index)).save(input_dir / "my_concept" / f"{index}.png")
        Image.new("L", (48, 48), 255 if index % 2 else 128).save(input_dir / "my_concept" / "mask" / f"{index}.png")
    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(input_dir))
    yield input_dir
    folder_paths.set_input_directory(old)


def _saved_images(outputs: dict, output_dir: Path) -> list[Path]:
    paths = [output_dir / image["subfolder"] / image["filename"]
             for node in outputs.values() for image in node.get("images", []) if image["type"] == "output"]
    assert paths and all(path.is_file() for path in paths)
    return paths


def test_every_shipped_workflow_runs_in_comfyuis_executor_on_tiny_models(perfusion_dir, photo_folder, small_corpus):
    import folder_paths
    from support.comfy_runner import run_prompt
    register_test_nodes()
    output_dir = Path(folder_paths.get_output_directory())
    ran = set()

    # Train with the photos' masks, then without (no mask folder): concept file, loss plot and a test image.
    _, outputs = run_prompt(_on_tiny_models(to_api(load(TRAIN))))
    assert (perfusion_dir / "my_concept_00001.safetensors").is_file()
    _saved_images(outputs, output_dir)
    shutil.rmtree(photo_folder / "my_concept" / "mask")
    run_prompt(_on_tiny_models(to_api(load(TRAIN)), name="my_other_concept", superclass="cat"))
    assert (perfusion_dir / "my_other_concept_00001.safetensors").is_file()
    ran.add(TRAIN)

    # Generate, two concepts and the sweep load what training saved, under the names the workflows ship with.
    for name in (GENERATE, TWO, SWEEP):
        _, outputs = run_prompt(_on_tiny_models(to_api(load(name))))
        _saved_images(outputs, output_dir)
        ran.add(name)

    # SAM3's masks: with its nodes muted (no SAM3, or a host without it) the workflow trains without masks.
    auto_masks = load(AUTO_MASKS)
    sam3_nodes = _sam3_part(auto_masks)
    for node in auto_masks["nodes"]:
        if node["id"] in sam3_nodes:
            node["mode"] = 2
    prompt = _on_tiny_models(to_api(auto_masks), name="masked_by_sam3")
    train = nodes_of_type(prompt, "PerfusionTrainConcept")[0]["inputs"]
    assert "masks" not in train and isinstance(train["superclass"], list), train  # the word comes from one node
    _, outputs = run_prompt(prompt)
    assert (perfusion_dir / "masked_by_sam3_00001.safetensors").is_file()
    ran.add(AUTO_MASKS)
    assert ran == {path.name for path in WORKFLOW_FILES}, "a shipped workflow is not run by this test"


def _sam3_part(workflow: dict) -> set[int]:
    """The nodes inside the SAM3 group (what its note tells a user without SAM3 to mute): the SAM3 model, its
    prompt, SAM3_Detect and the mask preview."""
    from support.shipped_workflows import SAM3_GROUP
    x, y, width, height = next(g["bounding"] for g in workflow["groups"] if g["title"] == SAM3_GROUP)
    inside = {node["id"] for node in workflow["nodes"] if x <= node["pos"][0] <= x + width and
              y <= node["pos"][1] <= y + height}
    assert {node["type"] for node in workflow["nodes"] if node["id"] in inside} == \
        {"CheckpointLoaderSimple", "CLIPTextEncode", "SAM3_Detect", "MaskPreview"}
    return inside


def test_the_sam3_workflow_validates_where_the_host_has_sam3(tmp_path, monkeypatch):
    """On the current host the auto-mask workflow, unmuted, is a valid prompt for ComfyUI: SAM3_Detect gets its
    model, the photos and the superclass's conditioning, and its masks go to the trainer. (It is not run: no
    SAM3 weights can be had here.) On the minimum host SAM3_Detect is the one node ComfyUI does not know."""
    import asyncio
    import execution
    import folder_paths
    import nodes
    from conftest import HOST_NAME
    from support.shipped_workflows import SAM3_CHECKPOINT, SAM3_NODES
    workflow = load(AUTO_MASKS)
    unknown = {node["type"] for node in workflow["nodes"]} - set(nodes.NODE_CLASS_MAPPINGS) - {"Note"}
    if HOST_NAME == "minimum":
        assert unknown == set(SAM3_NODES)
        return
    assert unknown == set()
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for name in {n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple"}:
        (checkpoints / name).write_bytes(b"")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", ([str(checkpoints)], {".safetensors"}))
    folder_paths.filename_list_cache.pop("checkpoints", None)
    input_dir = tmp_path / "input"
    (input_dir / "my_concept").mkdir(parents=True)
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(input_dir))
    prompt = to_api(workflow)
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("sam3", prompt, None))
    assert valid, (error, node_errors)
    detect = next(key for key, node in prompt.items() if node["class_type"] == "SAM3_Detect")
    train = nodes_of_type(prompt, "PerfusionTrainConcept")[0]["inputs"]
    assert train["masks"] == [detect, 0]
    assert SAM3_CHECKPOINT in {node["inputs"].get("ckpt_name") for node in prompt.values()}


def test_the_readme_headless_command_runs_the_whole_chain_in_a_fresh_copy(tmp_path):
    """The README's main-job command, as written there, in a copy of the working tree (as a fresh clone)."""
    readme = (REPO / "README.md").read_text()
    command = "bash tools/run.sh --output perfusion-output"
    assert command in readme
    clone = tmp_path / "perfusion"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".git", "__pycache__", "perfusion-output"))
    result = subprocess.run(command.split(), cwd=clone, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "SMOKE RUN" in log
    output = clone / "perfusion-output"
    assert list((output / "concepts").glob("my_concept_*.safetensors"))
    assert len(list((output / "perfusion").glob("*.png"))) >= 2


def test_readme_documents_every_input_of_every_node(pack):
    """The README's node tables name every input (a new input without documentation fails here)."""
    readme = (REPO / "README.md").read_text()
    for node in pack.nodes.NODES:
        schema = node.define_schema()
        assert f"(`{schema.node_id}`)" in readme, schema.node_id
        for item in schema.inputs:
            assert item.id in readme, f"{schema.node_id}.{item.id} is not in the README"


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "/nonexistent/model.safetensors"], "--checkpoint /nonexistent/model.safetensors: no such file"),
    (["--images", "/nonexistent/photos"], "--images /nonexistent/photos: no such folder"),
    (["no_such_workflow.json"], "No workflow"),
])
def test_headless_runner_refuses_missing_inputs_with_a_clear_message(args, message):
    import sys
    result = subprocess.run([sys.executable, str(REPO / "tools" / "run_workflow.py"), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr

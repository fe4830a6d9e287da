"""Issue 7: the shipped workflows through the real ComfyUI server, concurrency, cancel, and a clean base model.

A real `main.py` runs on a loopback port with only this pack among its custom nodes (tests/comfy_server.py)
over the tiny random SD1.5-format checkpoint of support/tiny_checkpoint.py (its images are noise). The
shipped workflows (workflows/*.json, the editor's format) are converted to API prompts with
support/workflow_api.py and the server's own /object_info; the test changes only what it must (checkpoint,
photo folder, concept names and files, a few steps, 64 px images, a covariance file instead of estimating
one over the whole caption corpus on CPU) and posts them to /prompt. Then:

1. each shipped workflow finishes (/history) and its outputs exist (concept files that read back, images
   that the server serves through /view); the two-concept workflow gets the trained concept and a second
   one made from it in the test (a second training would only add a minute of CLIP-L backpropagation);
2. several prompts are posted at once (from parallel threads); one long training run is cancelled midway
   through /interrupt (once the websocket reports its first training step); the others finish, the
   cancelled run saved nothing and no half-written file is left anywhere;
3. after all that, the base model that the server holds in its cache samples a latent (stock SaveLatent,
   exact tensors) bit-identical to the same prompt on a second, freshly started server loading the same
   checkpoint file. Both servers run with the same flags and the same thread count (OMP_NUM_THREADS, see
   comfy_server.SERVER_THREADS), since CPU results may depend on how work is split between threads.

Both servers run with --fp32-text-enc: ComfyUI's default on CPU is a float16 text encoder, which is about
3.5x slower on this CPU and training backpropagates through all of CLIP-L. Bounded in time: every wait has
a timeout and the servers stop themselves (see comfy_server.ComfyServer).
"""
from __future__ import annotations

import io
import json
import logging
import re
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors.torch
import torch

from comfy_server import (CHECKPOINT_NAME, REPO, ComfyServer, Events, output_files, require_success,
                          tiny_checkpoint_file)
from support.tiny_checkpoint import write_placeholder_photos
from support.workflow_api import nodes_of_type, ui_to_api

pytestmark = [pytest.mark.host, pytest.mark.server]
log = logging.getLogger(__name__)

SERVER_ARGS = ["--fp32-text-enc"]
PHOTOS = "photos"
COVARIANCE = "test_covariance.safetensors"
SIZE = 64                       # image side: an 8x8 latent
SAMPLE_STEPS = 2
FIRST, SECOND = "hugsy", "teddo"  # trained through the shipped train workflow; made from FIRST
SHIPPED_NAMES = ("my_concept", "my_other_concept")
WAIT = 240                      # seconds, for any one prompt (a training step of CLIP-L takes seconds on CPU)


# ---------------------------------------------------------------- the server and its inputs

def _write_covariance(folder: Path) -> None:
    """A random symmetric positive definite 768x768 covariance (key `covariance`), so training does not
    estimate one over the whole caption corpus with CLIP-L on the CPU (minutes)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(768, 768, generator=generator, dtype=torch.float64) / 768 ** 0.5
    C = (A @ A.T + torch.eye(768, dtype=torch.float64)).float().contiguous()
    safetensors.torch.save_file({"covariance": C}, str(folder / COVARIANCE))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, host):
    return tiny_checkpoint_file(tmp_path_factory)


@pytest.fixture(scope="module")
def server(tmp_path_factory, host, checkpoint):
    srv = ComfyServer(host, tmp_path_factory.mktemp("comfy_server"), checkpoint, extra_args=SERVER_ARGS,
                      lifetime=900)  # the whole module, with room for a slow, shared machine
    srv.layout()
    write_placeholder_photos(srv.input_dir / PHOTOS)
    _write_covariance(srv.models / "perfusion_covariance")
    with srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


# ---------------------------------------------------------------- shipped workflows, made tiny

def shipped(name: str, object_info: dict, *, seed: int, concept_name: str | None = None,
            concept_files: tuple[str, ...] = (), train_steps: int = 2) -> dict:
    """workflows/<name>.json as an API prompt, with only what this test must change set. (Two training steps at
    least: the stock loss graph node of the train workflow divides by max - min of the losses.)"""
    workflow = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    prompt = ui_to_api(workflow, object_info)
    for node in nodes_of_type(prompt, "CheckpointLoaderSimple"):
        node["inputs"]["ckpt_name"] = CHECKPOINT_NAME
    for node in nodes_of_type(prompt, "PerfusionLoadPhotos"):
        node["inputs"].update(folder=PHOTOS, size=SIZE)
    for node in nodes_of_type(prompt, "PerfusionTrainConcept"):
        node["inputs"].update(name=concept_name, seed=seed, steps=train_steps, batch_size=1, resolution=SIZE,
                              covariance=COVARIANCE, gradient_accumulation=1)
    loaders = nodes_of_type(prompt, "PerfusionLoadConcept")
    assert len(loaders) == len(concept_files), f"{name}: {len(loaders)} concept loaders"
    for node, filename in zip(loaders, concept_files):
        node["inputs"]["concept_name"] = filename
    # The concepts' words in the prompt: the shipped names become the names of the concepts used here.
    words = [concept_name] if concept_name else [Path(f).stem.rsplit("_", 1)[0] for f in concept_files]
    for node in nodes_of_type(prompt, "CLIPTextEncode"):
        text = node["inputs"]["text"]
        for shipped_word, word in zip(SHIPPED_NAMES, words):
            text = re.sub(rf"embedding:{shipped_word}\b", f"embedding:{word}", text)
        node["inputs"]["text"] = text
    for node in nodes_of_type(prompt, "KSampler"):
        node["inputs"].update(seed=seed, steps=SAMPLE_STEPS)
    for node in nodes_of_type(prompt, "EmptyLatentImage"):
        node["inputs"].update(width=SIZE, height=SIZE)
    texts = " ".join(n["inputs"]["text"] for n in nodes_of_type(prompt, "CLIPTextEncode"))
    for word in words:
        assert f"embedding:{word}" in texts, f"{name}: the prompt does not use embedding:{word}: {texts}"
    return prompt


def plain_prompt(seed: int, text: str) -> dict:
    """The checkpoint alone (no Perfusion node): sample, and the latent through the VAE and back, both saved
    exactly with the stock SaveLatent."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry, " + text}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": SAMPLE_STEPS, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/plain_{seed}"}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "8": {"class_type": "VAEEncode", "inputs": {"pixels": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"latents/vae_{seed}"}},
    }


# ---------------------------------------------------------------- checks

def check_outputs(server: ComfyServer, entry: dict, kinds: set[str]) -> list[Path]:
    """Every file the entry reports exists; images are served by /view and decode; returns the paths."""
    files = output_files(entry)
    assert kinds <= {kind for kind, _ in files}, f"expected outputs {kinds}, got {entry['outputs']}"
    paths = []
    for kind, record in files:
        folder = {"output": server.output_dir, "temp": server.base / "temp"}[record.get("type", "output")]
        path = folder / record.get("subfolder", "") / record["filename"]
        assert path.is_file(), f"{kind} output {path} is missing"
        if kind == "images":
            from PIL import Image
            query = urllib.parse.urlencode({"filename": record["filename"], "subfolder": record.get("subfolder", ""),
                                            "type": record.get("type", "output")})
            served = server.get(f"/view?{query}")
            assert served == path.read_bytes()
            Image.open(io.BytesIO(served)).verify()
        paths.append(path)
    return paths


def saved_concepts(entry: dict) -> list[str]:
    """The file names the PerfusionSaveConcept nodes of an entry report."""
    return [name for output in entry["outputs"].values() for name in output.get("text", [])
            if name.endswith(".safetensors")]


def check_concept_file(server: ComfyServer, filename: str, name: str) -> None:
    from perfusion_ops.concept_file import read_concept
    concept = read_concept(server.models / "perfusion" / filename)
    assert (concept.name, concept.arch, concept.superclass) == (name, "sd1", "teddy")
    assert concept.values and all(torch.isfinite(v).all() for v in concept.values.values())


TEMPORARY = re.compile(r"(^\.|\.partial$|\.tmp$|\.part$|~$)")


def check_nothing_half_written(server: ComfyServer) -> None:
    """No temporary or partial file under the concept, covariance and output folders; every concept file,
    image and latent there reads completely."""
    from PIL import Image
    from perfusion_ops.concept_file import read_concept
    for folder in (server.models / "perfusion", server.models / "perfusion_covariance", server.output_dir):
        for path in folder.rglob("*"):
            assert not TEMPORARY.search(path.name), f"left behind: {path}"
            if path.suffix == ".safetensors" and folder.name == "perfusion":
                read_concept(path)
            elif path.suffix == ".png":
                Image.open(path).verify()
            elif path.suffix == ".latent":
                safetensors.torch.load_file(str(path))


# ---------------------------------------------------------------- the tests, in order

def _write_second_concept(server: ComfyServer) -> None:
    """SECOND: FIRST with another name and other vectors (i* turned well away from FIRST's, u = C⁻¹ i* with
    the test covariance), written by the pack's own writer. Cheaper than a second training (seconds of CLIP-L
    backpropagation per step on the CPU) and as good for the two-concept workflow."""
    from perfusion_ops.concept_file import read_concept, write_concept
    first = read_concept(server.models / "perfusion" / f"{FIRST}_00001.safetensors")
    generator = torch.Generator().manual_seed(1)

    def noise(t, scale):
        return t + scale * t.norm() / t.numel() ** 0.5 * torch.randn(t.shape, generator=generator)
    i_star = noise(first.i_star, 1.0)
    C = safetensors.torch.load_file(str(server.models / "perfusion_covariance" / COVARIANCE))["covariance"].double()
    u = torch.linalg.solve(C, i_star.double()).float()
    second = first.replace(name=SECOND, i_star=i_star, u=u,
                           embeddings={k: noise(v, 0.5) for k, v in first.embeddings.items()},
                           values={k: noise(v, 0.5) for k, v in first.values.items()})
    write_concept(second, server.models / "perfusion" / f"{SECOND}_00001.safetensors")


def test_shipped_workflows_finish_and_produce_outputs(server, object_info):
    started = time.monotonic()
    entry = server.run(shipped("perfusion_train_concept", object_info, seed=1, concept_name=FIRST), WAIT)
    check_outputs(server, entry, {"images"})  # the test image and the loss graph
    assert saved_concepts(entry) == [f"{FIRST}_00001.safetensors"], entry["outputs"]
    check_concept_file(server, f"{FIRST}_00001.safetensors", FIRST)
    trained = time.monotonic()
    _write_second_concept(server)

    entry = server.run(shipped("perfusion_generate", object_info, seed=3,
                               concept_files=(f"{FIRST}_00001.safetensors",)), WAIT)
    check_outputs(server, entry, {"images"})
    entry = server.run(shipped("perfusion_two_concepts", object_info, seed=4,
                               concept_files=(f"{FIRST}_00001.safetensors", f"{SECOND}_00001.safetensors")), WAIT)
    check_outputs(server, entry, {"images"})
    log.info("shipped workflows: training %.1f s, generate and two concepts %.1f s",
             trained - started, time.monotonic() - trained)


def test_concurrent_prompts_with_one_training_cancelled_midway(server, object_info):
    concepts = {p.name for p in (server.models / "perfusion").glob("*.safetensors")}
    assert {f"{FIRST}_00001.safetensors", f"{SECOND}_00001.safetensors"} <= concepts, "needs the trained concepts"
    long_steps = 100_000
    cancelled = shipped("perfusion_train_concept", object_info, seed=5, concept_name="cancelled",
                        train_steps=long_steps)
    train_node = next(k for k, v in cancelled.items() if v["class_type"] == "PerfusionTrainConcept")
    batch = {
        "generate": shipped("perfusion_generate", object_info, seed=6, concept_files=(f"{SECOND}_00001.safetensors",)),
        "cancelled": cancelled,
        "two": shipped("perfusion_two_concepts", object_info, seed=7,
                       concept_files=(f"{SECOND}_00001.safetensors", f"{FIRST}_00001.safetensors")),
        "late": shipped("perfusion_train_concept", object_info, seed=8, concept_name="late"),
    }
    with Events(server) as events:
        with ThreadPoolExecutor(len(batch)) as pool:  # all at once, in whatever order the server takes them
            futures = {key: pool.submit(server.queue_prompt, prompt, events.client_id) for key, prompt in batch.items()}
            ids = {key: future.result() for key, future in futures.items()}
        queued = time.monotonic()
        step = events.wait_for(lambda m: m.get("type") == "progress" and m["data"].get("prompt_id") == ids["cancelled"]
                               and m["data"].get("node") == train_node and m["data"]["value"] >= 1,
                               timeout=WAIT, what="first training step of the run to cancel")
        assert step["data"]["max"] == long_steps
        running = server.get("/queue")["queue_running"]
        assert [item[1] for item in running] == [ids["cancelled"]], running
        interrupted_at = time.monotonic()
        server.post("/interrupt", {"prompt_id": ids["cancelled"]})
        entries = server.wait(ids.values(), timeout=3 * WAIT)
        finished = time.monotonic()
        steps_done = max(m["data"]["value"] for m in events.of(ids["cancelled"], "progress")
                         if m["data"].get("node") == train_node)
    log.info("concurrent batch: first step of the cancelled run after %.1f s, all done %.1f s after the interrupt",
             interrupted_at - queued, finished - interrupted_at)

    for key in ("generate", "two", "late"):
        require_success(entries[ids[key]], server)
        check_outputs(server, entries[ids[key]], {"images"})
    assert saved_concepts(entries[ids["late"]]) == ["late_00001.safetensors"]
    check_concept_file(server, "late_00001.safetensors", "late")

    status = entries[ids["cancelled"]]["status"]
    assert status["status_str"] == "error"
    assert "execution_interrupted" in [m[0] for m in status["messages"]], status["messages"]
    assert 1 <= steps_done < long_steps
    assert output_files(entries[ids["cancelled"]]) == [] and not saved_concepts(entries[ids["cancelled"]])
    # Nothing under the final name; what it learned (save_on_cancel, on by default) only under a name saying so.
    assert not list((server.models / "perfusion").glob("cancelled*.safetensors")), "the cancelled run saved a concept"
    kept = [p.name for p in (server.models / "perfusion" / "cancelled_snapshots").glob("*.safetensors")]
    assert len(kept) == 1 and kept[0].startswith("cancelled_cancelled_step"), kept
    check_nothing_half_written(server)
    assert server.get("/queue") == {"queue_running": [], "queue_pending": []}


def _latents(server: ComfyServer, entry: dict) -> dict[str, torch.Tensor]:
    latents = {}
    for node_id, output in entry["outputs"].items():
        for record in output.get("latents", []):
            path = server.output_dir / record.get("subfolder", "") / record["filename"]
            latents[node_id] = safetensors.torch.load_file(str(path))["latent_tensor"]
    return latents


def test_base_model_in_the_server_cache_samples_bit_identical_to_a_fresh_load(server, host, checkpoint,
                                                                              tmp_path_factory):
    seed, text = 987654321, "a photo of a plain teddy, never asked for before"
    prompt = plain_prompt(seed, text)
    entry = server.run(prompt, WAIT)
    cached = {node for event, data in entry["status"]["messages"] if event == "execution_cached"
              for node in data["nodes"]}
    assert "1" in cached, "the checkpoint loader did not come from the server's cache; nothing was tested"
    after_all_that = _latents(server, entry)

    started = time.monotonic()
    with ComfyServer(host, tmp_path_factory.mktemp("fresh_server"), checkpoint, extra_args=SERVER_ARGS) as fresh:
        fresh_entry = fresh.run(prompt, WAIT)
        fresh_latents = _latents(fresh, fresh_entry)
    log.info("fresh server: started, sampled and stopped in %.1f s", time.monotonic() - started)

    assert set(after_all_that) == set(fresh_latents) == {"6", "9"}
    for node_id, latent in after_all_that.items():
        other = fresh_latents[node_id]
        assert latent.dtype == other.dtype and latent.shape == other.shape
        assert latent.numpy().tobytes() == other.numpy().tobytes(), \
            f"SaveLatent {node_id}: max difference {(latent - other).abs().max().item():g}"


def test_template_browser_lists_the_shipped_workflows_with_their_thumbnails(server):
    """The editor's template browser lists workflows/*.json under the pack's folder name and shows
    /api/workflow_templates/<pack>/<name>.jpg for each (tools/make_thumbnails.py writes them)."""
    from PIL import Image
    shipped = sorted(path.stem for path in (REPO / "workflows").glob("*.json"))
    listed = server.get("/api/workflow_templates")
    assert sorted(listed.get("perfusion", [])) == shipped, listed
    for name in shipped:
        workflow = server.get(f"/api/workflow_templates/perfusion/{name}.json")
        assert workflow == json.loads((REPO / "workflows" / f"{name}.json").read_text())
        thumbnail = server.get(f"/api/workflow_templates/perfusion/{name}.jpg")
        assert isinstance(thumbnail, bytes), f"{name}.jpg: not served as an image"
        with Image.open(io.BytesIO(thumbnail)) as image:
            assert image.format == "JPEG" and image.width >= 300, (name, image.format, image.size)

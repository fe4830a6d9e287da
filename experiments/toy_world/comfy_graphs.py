"""Driving ComfyUI: API-format prompts run by ComfyUI's own executor in-process, two small helper nodes (the
world's photos as an IMAGE batch, and an image sink), and the graphs the experiments use."""
from __future__ import annotations

import asyncio
import itertools

import numpy as np
import torch

import world

CAPTURED: dict[str, np.ndarray] = {}
_ids = itertools.count()


class ToyWorldConceptPhotos:
    """The few training photos of a held-out concept, rendered by the world generator (IMAGE [N, SIZE, SIZE, 3]),
    and the concept's exact masks (MASK [N, SIZE, SIZE])."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"concept": ("STRING", {"default": "tw_star"}), "seed": ("INT", {"default": 0}),
                             "count": ("INT", {"default": 4, "min": 1, "max": 64})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "photos"
    CATEGORY = "toy_world"

    def photos(self, concept, seed, count):
        import world
        scenes = world.concept_training_scenes(concept, seed, count)
        return (torch.from_numpy(np.stack([world.render(s) for s in scenes])),
                torch.from_numpy(np.stack([world.object_mask(s) for s in scenes])))


class ToyWorldCapture:
    """Output node that keeps the images it receives in memory under `tag`."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "tag": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "toy_world"

    def capture(self, images, tag):
        CAPTURED[tag] = images.detach().cpu().float().numpy().copy()
        return {}


def register_nodes():
    import nodes
    nodes.NODE_CLASS_MAPPINGS["ToyWorldConceptPhotos"] = ToyWorldConceptPhotos
    nodes.NODE_CLASS_MAPPINGS["ToyWorldCapture"] = ToyWorldCapture


class _StubServer:
    """The little of PromptServer that PromptExecutor uses when no client is connected."""
    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None):
        pass


class Runner:
    """One PromptExecutor kept across prompts, so ComfyUI caches the loaded checkpoint between them."""

    def __init__(self):
        from support.comfy_runner import new_executor
        self.executor = new_executor(_StubServer())

    def run(self, prompt: dict) -> None:
        import execution
        prompt_id = f"toy-{next(_ids)}"
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            raise RuntimeError(f"prompt did not validate: {error} {node_errors}")
        self.executor.execute(prompt, prompt_id, extra_data={}, execute_outputs=outputs)
        if not self.executor.success:
            raise RuntimeError(f"prompt failed: {self.executor.status_messages[-1]}")


# ----------------------------------------------------------------------------------------------------------
# Graphs


def train_graph(ckpt: str, concept: str, superclass: str, photo_seed: int, filename_prefix: str, settings: dict) -> dict:
    """CheckpointLoaderSimple -> PerfusionTrainConcept (on the world's photos; with their masks if settings has
    "masks": True) -> PerfusionSaveConcept."""
    settings = dict(settings)
    masks = {"masks": ["photos", 1]} if settings.pop("masks", False) else {}
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "photos": {"class_type": "ToyWorldConceptPhotos", "inputs": {"concept": concept, "seed": photo_seed, "count": 4}},
        "train": {"class_type": "PerfusionTrainConcept", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "images": ["photos", 0],
            "name": concept, "superclass": superclass, **masks, **settings}},
        "save": {"class_type": "PerfusionSaveConcept", "inputs": {"concept": ["train", 0],
                                                                  "filename_prefix": filename_prefix}},
    }


def sample_graph(ckpt: str, prompts: dict[str, str], sampling: dict, concepts: list[dict] | None = None) -> dict:
    """CheckpointLoaderSimple [-> PerfusionLoadConcept -> PerfusionApplyConcept (chained, one per entry of
    `concepts`, or one PerfusionCombineConcepts)] -> CLIPTextEncode -> KSampler -> VAEDecode -> capture.
    `prompts`: tag -> text. `concepts`: [{"file", "strength", "beta", "tau"[, "key_locking"]}] or
    [{"files": [...], "combine": True, ...}]."""
    g = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    model, clip = ["ckpt", 0], ["ckpt", 1]
    for i, c in enumerate(concepts or []):
        files = c["files"] if "files" in c else [c["file"]]
        loaded = []
        for j, f in enumerate(files):
            g[f"load{i}_{j}"] = {"class_type": "PerfusionLoadConcept", "inputs": {"concept_name": f}}
            loaded.append([f"load{i}_{j}", 0])
        source = loaded[0]
        if len(loaded) > 1:
            g[f"combine{i}"] = {"class_type": "PerfusionCombineConcepts",
                                "inputs": {f"concept_{k + 1}": ref for k, ref in enumerate(loaded)}}
            source = [f"combine{i}", 0]
        g[f"apply{i}"] = {"class_type": "PerfusionApplyConcept", "inputs": {
            "model": model, "clip": clip, "concept": source, "strength": c.get("strength", 1.0),
            "beta": c.get("beta", 0.7), "tau": c.get("tau", 0.15), "start_at": 0.0, "end_at": 1.0,
            "key_locking": c.get("key_locking", "local")}}
        model, clip = [f"apply{i}", 0], [f"apply{i}", 1]
    g["negative"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}}
    g["latent"] = {"class_type": "EmptyLatentImage", "inputs": {"width": world.SIZE, "height": world.SIZE,
                                                                 "batch_size": sampling["batch"]}}
    for k, (tag, text) in enumerate(prompts.items()):
        g[f"pos{k}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": clip}}
        g[f"ks{k}"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": sampling["seed"] + k, "steps": sampling["steps"], "cfg": sampling["cfg"],
            "sampler_name": sampling["sampler"], "scheduler": sampling["scheduler"], "positive": [f"pos{k}", 0],
            "negative": ["negative", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
        g[f"dec{k}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"ks{k}", 0], "vae": ["ckpt", 2]}}
        g[f"cap{k}"] = {"class_type": "ToyWorldCapture", "inputs": {"images": [f"dec{k}", 0], "tag": tag}}
    return g

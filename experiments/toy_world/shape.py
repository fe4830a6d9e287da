"""Which latent keeps shape? (issue 20, item 2; REPORT.md §9)

The checkpoint's VAE keeps 8x8 patch colour means (base_model.mosaic_taesd): a 6x6 latent of a 48x48 scene, so a
star and a circle of the same colours differ only in how much of each patch they cover. A decoder learned on
that latent cannot put back what the latent lacks, so a world that keeps shape needs another latent. Before a
new base model is built on one (about an hour of CPU), this stage measures how much shape each candidate latent
carries: a shape classifier (the judges' network, judges._Net) is trained on single-object scenes seen through
each latent (nearest-upsampled back to 48x48) and tested on held-out scenes. Candidates:

- the image itself (no latent: the ceiling);
- today's latent: 8x8 patch means (6x6), which is what the mosaic VAE decodes to;
- 4x4 patch means (12x12): SD's 8x downscale of a 96x96 scene, four times the UNet's cost;
- today's patch means plus a fourth channel (today it is 0) that a learned 8x8 convolution fills: what the unused
  channel could carry at no cost to the UNet. It is learned jointly with the classifier, so it estimates the
  ceiling of any linear encoder that writes one more number per patch;
- four learned linear channels per 8x8 patch (a learned encoder at today's grid), also a ceiling.

A latent that carries shape is necessary, not sufficient: a decoder must also render it. add_vaes records what
the judges read on the decodes of each VAE of run.py (the mosaic one and patch_vae.py's).

    nice -n 10 ~/.cache/comfyui-perfusion/venv/bin/python experiments/toy_world/run.py --until shape
"""
from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

import judges
import world

log = logging.getLogger(__name__)

CONFIG = {"train_scenes": 8000, "test_scenes": 1400, "data_seed": 31, "epochs": 6, "batch": 64, "lr": 2e-3,
          "train_seeds": [0, 1]}
SHAPES = list(world.SHAPES)


class PatchMeans(torch.nn.Module):
    """The image as k x k patch colour means, nearest-upsampled back (a colour mosaic)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        return torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, self.k), scale_factor=self.k)


class LearnedPatchCode(torch.nn.Module):
    """`learned` channels per 8x8 patch written by a learned 8x8 stride-8 convolution, after today's three patch
    means when keep_means, nearest-upsampled back."""

    def __init__(self, learned: int, keep_means: bool):
        super().__init__()
        self.means = PatchMeans(8) if keep_means else None
        self.code = torch.nn.Conv2d(3, learned, 8, stride=8)

    def forward(self, x):
        code = torch.nn.functional.interpolate(self.code(x), scale_factor=8)
        return torch.cat([self.means(x), code], dim=1) if self.means is not None else code


class FixedPatchCode(torch.nn.Module):
    """A VAE's latent (4 linear 8x8 patch filters, patch_vae.read_filters), nearest-upsampled back."""

    def __init__(self, filters: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("filters", filters)
        self.register_buffer("bias", bias)

    def forward(self, x):
        latent = torch.nn.functional.conv2d(x, self.filters, self.bias, stride=8)
        return torch.nn.functional.interpolate(latent, scale_factor=8)


# name -> (latent shape, what it is, a builder of the module that turns an image into what the classifier sees,
# the channels it gives the classifier)
CANDIDATES = {
    "image": ("48x48x3", "the image itself (ceiling)", lambda: torch.nn.Identity(), 3),
    "means8": ("6x6x3", "today's latent: 8x8 patch means (the mosaic VAE)", lambda: PatchMeans(8), 3),
    "means4": ("12x12x3", "4x4 patch means (a 96x96 scene at SD's 8x downscale)", lambda: PatchMeans(4), 3),
    "means8+1": ("6x6x4", "today's means + 1 learned channel per patch (ceiling)",
                 lambda: LearnedPatchCode(1, keep_means=True), 4),
    "learned8x4": ("6x6x4", "4 learned channels per 8x8 patch (ceiling)", lambda: LearnedPatchCode(4, keep_means=False), 4),
}


def single_object_scenes(n: int, seed: int):
    """Single-object scenes of the judges' data (world objects, random looks, the concepts and their looks on
    other shapes), with their shape labels, the first n of them."""
    scenes, images = judges.judge_dataset(int(n / 0.65), seed)  # about 70% of the judges' scenes hold one object
    single = [i for i, s in enumerate(scenes) if s.labels["n_objects"] == 1][:n]
    assert len(single) == n, (len(single), n)
    labels = torch.tensor([SHAPES.index(scenes[i].labels["shape"]) for i in single])
    return [scenes[i] for i in single], images[single], labels


@functools.lru_cache(maxsize=1)
def train_and_test_scenes(train_scenes: int, test_scenes: int, data_seed: int):
    """The classifier's training and held-out scenes of a config (single_object_scenes of each), rendered once
    per process for every candidate and VAE."""
    return single_object_scenes(train_scenes, data_seed), single_object_scenes(test_scenes, data_seed + 1000)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(net, images: np.ndarray, labels: torch.Tensor, scenes) -> dict:
    """Accuracy overall, per size and per shape, and how often a star is read as a circle and back."""
    with torch.no_grad():
        predicted = torch.cat([net(judges._tensor(images[i:i + 256])).argmax(1) for i in range(0, len(images), 256)])
    right = (predicted == labels).numpy()
    sizes = np.array([s.labels["size"] for s in scenes])
    star, circle = SHAPES.index("star"), SHAPES.index("circle")
    out = {"accuracy": float(right.mean()), "n": len(right), "correct": int(right.sum())}
    for size in world.SIZES:
        out[f"accuracy_{size}"] = float(right[sizes == size].mean())
    for k, shape in enumerate(SHAPES):
        out[f"accuracy_{shape}"] = float(right[(labels == k).numpy()].mean())
    out["star_read_as_circle"] = float((predicted[labels == star] == circle).float().mean())
    out["circle_read_as_star"] = float((predicted[labels == circle] == star).float().mean())
    return out


def run_shape(out_dir: Path, cfg: dict = CONFIG) -> dict:
    """Train and test a shape classifier through every candidate latent, for each training seed; writes shape.json.
    Rows already in shape.json from the same config are kept (the VAEs of add_vaes may come later)."""
    path = out_dir / "shape.json"
    if path.is_file() and json.loads(path.read_text()).get("config") == cfg:
        return json.loads(path.read_text())
    t0 = time.time()
    (_, train_images, train_labels), (test_scenes, test_images, test_labels) = train_and_test_scenes(
        cfg["train_scenes"], cfg["test_scenes"], cfg["data_seed"])
    rows = [row for name, candidate in CANDIDATES.items()
            for row in _train_and_test(name, candidate, cfg, train_images, train_labels, test_scenes, test_images,
                                       test_labels)]
    result = {"config": cfg, "rows": rows, "seconds": time.time() - t0}
    path.write_text(json.dumps(result, indent=1))
    return result


def _train_and_test(name, candidate, cfg, train_images, train_labels, test_scenes, test_images, test_labels) -> list:
    """One row per training seed: the shape classifier trained through `candidate` and tested on held-out scenes."""
    latent, description, build, channels = candidate
    ce = torch.nn.CrossEntropyLoss()
    rows = []
    for seed in cfg["train_seeds"]:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(build(), judges._Net(len(SHAPES), in_channels=channels))
        start = time.time()
        judges._train(net, lambda logits, index: ce(logits, train_labels[index]), train_images, cfg["epochs"],
                      cfg["batch"], cfg["lr"], seed, f"shape/{name}")
        rows.append({"candidate": name, "latent": latent, "description": description, "seed": seed,
                     "train_seconds": time.time() - start, **evaluate(net.eval(), test_images, test_labels, test_scenes)})
        log.info("%s seed %d: shape accuracy %.3f", name, seed, rows[-1]["accuracy"])
    return rows


def add_vae_candidates(out_dir: Path, name: str, vae_config: dict, vae, cfg: dict = CONFIG) -> None:
    """Rows for a trained patch-code VAE (patch_vae.py) in shape.json: the classifier through its latent and
    through its decodes, which tells a latent that lacks shape from a decoder that does not render it. Rows of
    the same VAE (its config's cache key) are kept; rows of an earlier VAE of that name are replaced."""
    import base_model
    import cache
    import patch_vae
    path = out_dir / "shape.json"
    result = json.loads(path.read_text())
    (_, train_images, train_labels), (test_scenes, test_images, test_labels) = train_and_test_scenes(
        cfg["train_scenes"], cfg["test_scenes"], cfg["data_seed"])
    filters, bias = patch_vae.read_filters(vae.taesd_encoder)
    # name -> (candidate, what the classifier is trained and tested on): the decodes are computed once (the
    # training noise of judges._train then falls on the decoded image, not on the scene)
    candidates = {f"{name} latent": (("6x6x4", f"the {name} VAE's latent (its 4 trained filters)",
                                      lambda: FixedPatchCode(filters, bias), 4), lambda images: images),
                  f"{name} decodes": (("48x48x3", f"the {name} VAE's decodes", lambda: torch.nn.Identity(), 3),
                                      lambda images: base_model.reconstruct(vae, images))}
    key = cache.key(vae_config)
    for candidate_name, (candidate, seen) in candidates.items():
        if any(r["candidate"] == candidate_name and r.get("vae") == key for r in result["rows"]):
            continue
        result["rows"] = [r for r in result["rows"] if r["candidate"] != candidate_name]
        result["rows"] += [{**row, "vae": key} for row in _train_and_test(
            candidate_name, candidate, cfg, seen(train_images), train_labels, test_scenes, seen(test_images),
            test_labels)]
    path.write_text(json.dumps(result, indent=1))


def add_vaes(out_dir: Path, vaes: dict) -> None:
    """Record in shape.json what each VAE keeps: vaes maps a name to (its config, its stage folder, the folder of
    the judges trained through it, how far its filters moved in training or None); the judges' accuracies are on
    decodes of held-out scenes (judges.stage_judges)."""
    path = out_dir / "shape.json"
    result = json.loads(path.read_text())
    result["vaes"] = {}
    for name, (config, vae_folder, judge_folder, filter_movement) in vaes.items():
        vae_stats = json.loads((vae_folder / "stats.json").read_text())
        judge_stats = json.loads((judge_folder / "stats.json").read_text())
        result["vaes"][name] = {"config": config, "recon_l1_256": vae_stats["recon_l1_256"],
                                "seconds": vae_stats["seconds"], "judge_seconds": judge_stats["seconds"],
                                "attribute_accuracy_vae": judge_stats["attribute_accuracy_vae"],
                                "attribute_accuracy_clean": judge_stats["attribute_accuracy_clean"],
                                "concept_accuracy_vae": judge_stats["concept_accuracy_vae"],
                                "filter_movement": filter_movement}
    path.write_text(json.dumps(result, indent=1))

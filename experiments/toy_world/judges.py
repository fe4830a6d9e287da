"""Judges: small CNNs trained on rendered world images passed through the checkpoint's VAE (vae_fraction of
them; 1.0: all), so they read what generated images look like after VAEDecode: colour mosaics.

- AttributeJudge: background (6), and for single-object images position (3), shape (4), size (2), colour (6,
  world colours only), plus the object count (1 or 2). Trained on world objects and on objects with random
  looks, so it reads position and size of objects it has never seen (the held-out concepts included, which
  it never sees in training).
- ConceptJudge: one sigmoid per held-out concept: "is this concept in the image?". Positives: the concept in
  random contexts; negatives: world objects, random looks (including split / bullseye looks in other colours)
  and the concept's look on another shape.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import replace

import numpy as np
import torch

import cache
import world

log = logging.getLogger(__name__)

HEADS = {"background": list(world.BACKGROUNDS), "position": list(world.POSITIONS), "shape": list(world.SHAPES),
         "size": list(world.SIZES), "colour": list(world.COLOURS), "count": ["1", "2"]}
CONCEPT_NAMES = sorted(world.CONCEPTS)
JUDGE_CONFIG = {"version": 1, "train_images": 7000, "test_images": 600, "seed": 11, "epochs": 8, "batch": 64,
                "lr": 2e-3, "vae_fraction": 1.0}


class _Net(torch.nn.Module):
    def __init__(self, outputs: int, in_channels: int = 3):
        super().__init__()
        c = lambda i, o: [torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]  # noqa: E731
        self.features = torch.nn.Sequential(*c(in_channels, 32), torch.nn.MaxPool2d(2), *c(32, 64), torch.nn.MaxPool2d(2),
                                            *c(64, 96), torch.nn.MaxPool2d(2), *c(96, 128))  # 48 -> 6x6
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(128 * 36, 256), torch.nn.ReLU(),
                                        torch.nn.Dropout(0.2), torch.nn.Linear(256, outputs))

    def forward(self, x):  # x: [B, in_channels, 48, 48] in 0..1
        return self.head(self.features(x - 0.5))


class AttributeJudge(_Net):
    def __init__(self):
        super().__init__(sum(len(v) for v in HEADS.values()))

    def split(self, logits):
        out, i = {}, 0
        for name, classes in HEADS.items():
            out[name] = logits[:, i:i + len(classes)]
            i += len(classes)
        return out

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> list[dict]:
        """Per image: the predicted class of every head."""
        self.eval()
        logits = self.split(self(_tensor(images)))
        result = [{} for _ in range(len(images))]
        for name, classes in HEADS.items():
            for i, k in enumerate(logits[name].argmax(1).tolist()):
                result[i][name] = classes[k]
        return result


class ConceptJudge(_Net):
    def __init__(self):
        super().__init__(len(CONCEPT_NAMES))

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.eval()
        p = torch.sigmoid(self(_tensor(images))).numpy()
        return {name: p[:, i] for i, name in enumerate(CONCEPT_NAMES)}


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------------------
# Data


def _judge_scene(rng: random.Random) -> world.Scene:
    scene = world.generic_scene(rng, concept_rate=0.3)
    if rng.random() < 0.12:  # the concept's look on another shape: not the concept
        name = rng.choice(CONCEPT_NAMES)
        shape, look = world.CONCEPTS[name]
        objects = list(scene.objects)
        k = rng.randrange(len(objects))
        other = rng.choice([s for s in world.SHAPES if s != shape])
        objects[k] = replace(objects[k], shape=other, look=look, colour_word=None, concept=None)
        scene = replace(scene, objects=tuple(objects), labels=world.labels_of(scene.background, tuple(objects)))
    return scene


def judge_dataset(n: int, seed: int):
    rng = random.Random(seed)
    scenes = [_judge_scene(rng) for _ in range(n)]
    return scenes, np.stack([world.render(s) for s in scenes])


def _targets(scenes):
    """Attribute class indices (-1 = not applicable) and concept presence."""
    attr = {name: [] for name in HEADS}
    for s in scenes:
        lab = s.labels
        single = lab["n_objects"] == 1
        attr["background"].append(HEADS["background"].index(lab["background"]))
        attr["count"].append(lab["n_objects"] - 1)
        for name in ("position", "shape", "size"):
            attr[name].append(HEADS[name].index(lab[name]) if single else -1)
        attr["colour"].append(HEADS["colour"].index(lab["colour"]) if single and lab.get("colour") else -1)
    concepts = [[float(c in s.labels["concepts"]) for c in CONCEPT_NAMES] for s in scenes]
    return {k: torch.tensor(v) for k, v in attr.items()}, torch.tensor(concepts)


def _train(net, loss_fn, images, epochs, batch, lr, seed, name):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(images) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    x_all = _tensor(images)
    net.train()
    start = time.time()
    for step in range(steps):
        index = torch.randint(len(x_all), (batch,), generator=g)
        x = x_all[index] + 0.02 * torch.randn(x_all[index].shape, generator=g)
        loss = loss_fn(net(x), index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log.info("%s judge step %d/%d loss %.4f (%.0f s)", name, step + 1, steps, loss.item(), time.time() - start)
    net.eval()
    return net


def _with_vae(images, vae, fraction, seed):
    import base_model
    rng = np.random.default_rng(seed)
    chosen = rng.random(len(images)) < fraction
    out = images.copy()
    out[chosen] = base_model.reconstruct(vae, images[chosen])
    return out


def attribute_accuracy(judge: AttributeJudge, scenes, images) -> dict:
    preds = judge.predict(images)
    attr, _ = _targets(scenes)
    acc = {}
    for name, classes in HEADS.items():
        idx = [i for i in range(len(scenes)) if attr[name][i] >= 0]
        acc[name] = sum(preds[i][name] == classes[attr[name][i]] for i in idx) / max(1, len(idx))
    return acc


def concept_accuracy(judge: ConceptJudge, scenes, images) -> dict:
    probs = judge.probabilities(images)
    _, present = _targets(scenes)
    return {name: float(((probs[name] > 0.5) == (present[:, i] > 0.5).numpy()).mean())
            for i, name in enumerate(CONCEPT_NAMES)}


def stage_judges(vae_path, cfg=JUDGE_CONFIG):
    """Train (or load from the cache) both judges; returns the cache folder."""
    folder = cache.folder("judges", {**cfg, "vae": str(vae_path)})
    if (folder / "stats.json").is_file():
        return folder
    import run
    t0 = time.time()
    torch.manual_seed(cfg["seed"])
    vae = run.load_vae(vae_path)
    scenes, clean = judge_dataset(cfg["train_images"], cfg["seed"])
    images = _with_vae(clean, vae, cfg["vae_fraction"], cfg["seed"])
    attr, present = _targets(scenes)
    ce = torch.nn.CrossEntropyLoss(ignore_index=-1)

    attribute = AttributeJudge()

    def attribute_loss(logits, index):
        parts = attribute.split(logits)
        return sum(ce(parts[name], attr[name][index]) for name in HEADS if (attr[name][index] >= 0).any())
    _train(attribute, attribute_loss, images, cfg["epochs"], cfg["batch"], cfg["lr"], cfg["seed"], "attribute")

    concept = ConceptJudge()
    bce = torch.nn.BCEWithLogitsLoss()
    _train(concept, lambda logits, index: bce(logits, present[index]), images, cfg["epochs"], cfg["batch"],
           cfg["lr"], cfg["seed"] + 1, "concept")
    torch.save(attribute.state_dict(), folder / "attribute.pt")
    torch.save(concept.state_dict(), folder / "concept.pt")

    test_scenes, test_clean = judge_dataset(cfg["test_images"], cfg["seed"] + 1000)
    test_vae = base_model_reconstruct(vae, test_clean)
    stats = {"seconds": time.time() - t0,
             "attribute_accuracy_clean": attribute_accuracy(attribute, test_scenes, test_clean),
             "attribute_accuracy_vae": attribute_accuracy(attribute, test_scenes, test_vae),
             "concept_accuracy_clean": concept_accuracy(concept, test_scenes, test_clean),
             "concept_accuracy_vae": concept_accuracy(concept, test_scenes, test_vae),
             "test_concept_positives": {n: int(sum(n in s.labels["concepts"] for s in test_scenes))
                                        for n in CONCEPT_NAMES}}
    (folder / "stats.json").write_text(json.dumps(stats, indent=1))
    log.info("judges done in %.0f s: %s", time.time() - t0, stats)
    return folder


def base_model_reconstruct(vae, images):
    import base_model
    return base_model.reconstruct(vae, images)


def load_judges(folder):
    attribute, concept = AttributeJudge(), ConceptJudge()
    attribute.load_state_dict(torch.load(folder / "attribute.pt"))
    concept.load_state_dict(torch.load(folder / "concept.pt"))
    return attribute.eval(), concept.eval()

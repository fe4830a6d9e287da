"""The concept's own gate input r after a run of the default training recipe, on the tiny test models.

The gate σ((r − β)/τ) only acts as a knob when the concept's own word gets r ≈ 1 in prompts it was not trained
on (docs/method.md §5). This trains the shipped test photos (tests/data/teddy, with masks) with every setting at
its default (TrainSettings()) on the tiny SD1 and SDXL models the tests use, and reports the recorded
`gate_input` and r in each held-out prompt. Too slow for the test suite (minutes per architecture on a CPU).

    python benchmarks/bench_gate_input.py [--arch sd1 sdxl] [--steps N] [--write]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time

from common import REPO, boot_comfyui, environment, publish

log = logging.getLogger("bench_gate_input")
HEADING = "## Train: the concept's own gate input after a default run (tiny models)"
GOAL = 0.1  # |gate_input − 1| the recipe should reach


def run(arch: str, steps: int | None) -> dict:
    import torch
    from perfusion_ops import train
    from perfusion_ops.covariance import cached_covariance, inverse, metric_vector
    from perfusion_ops.photos import load_photo_folder
    from support.tiny_models import tiny_clip, tiny_model, tiny_vae
    settings = train.TrainSettings() if steps is None else train.TrainSettings(steps=steps)
    model, clip, vae = tiny_model(arch), tiny_clip(arch), tiny_vae()
    images, masks, _ = load_photo_folder(REPO / "tests" / "data" / "teddy", 64, "crop")
    with tempfile.TemporaryDirectory() as cache:
        C, fingerprint = cached_covariance(clip, cache)
    start = time.perf_counter()
    concept, losses = train.train_concept(model, clip, vae.encode(images), "hugsy", "teddy", C, fingerprint,
                                          settings, masks=masks)
    seconds = time.perf_counter() - start
    recorded = json.loads(concept.train)["gate_input"]
    # r per held-out prompt, recomputed from the file's own i* and u through a CLIP that knows the word.
    from perfusion_ops.host import encode_with_grad
    from perfusion_ops.text import clip_with_concepts
    concept_clip = clip_with_concepts(clip, [concept])
    per_prompt = {}
    for prompt in train.GATE_CHECK_PROMPTS:
        context, _, positions = encode_with_grad(concept_clip, prompt.format("embedding:hugsy"))
        per_prompt[prompt] = train.own_gate_input(context[0, positions[0]], concept.i_star, concept.u)
    return {"arch": arch, "steps": settings.steps, "photos": int(images.shape[0]), "seconds": seconds,
            "gate_input": recorded, "per_prompt": per_prompt, "loss": [losses[0], losses[-1]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sd1", "sdxl"], choices=["sd1", "sdxl"])
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps (default: the recipe's)")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host = boot_comfyui(cpu=True)
    from perfusion_ops.train import TrainSettings
    rows = []
    for arch in args.arch:
        rows.append(run(arch, args.steps))
        log.info("%s", rows[-1])
    env = environment(host)
    recipe = TrainSettings()
    lines = [f"Measured {env['date']} on {env['machine']}, torch {env['torch']}, ComfyUI {env['ComfyUI']}. "
             f"Tiny test models (support/tiny_models.py, seed 0), the {rows[0]['photos']} test photos of "
             "tests/data/teddy with their masks at 64², every training setting at its default "
             f"(steps {recipe.steps}, batch {recipe.batch_size} x {recipe.gradient_accumulation} micro-batches, "
             f"value lr {recipe.value_lr}, embedding lr {recipe.embedding_lr}) unless the table says otherwise. "
             f"`gate_input` is the mean r of the finished word over the held-out prompts; goal |r − 1| < {GOAL}.",
             "", "| model | steps | gate_input | r per held-out prompt | loss first → last | wall time |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        per_prompt = ", ".join(f"{r:.3f}" for r in row["per_prompt"].values())
        verdict = "within goal" if abs(row["gate_input"] - 1) < GOAL else "OUTSIDE goal"
        lines.append(f"| tiny {row['arch']} | {row['steps']} | {row['gate_input']:.3f} ({verdict}) | {per_prompt} | "
                     f"{row['loss'][0]:.4f} → {row['loss'][1]:.4f} | {row['seconds'] / 60:.1f} min |")
    lines += ["", "Held-out prompts, in the order of the r column: " +
              "; ".join(f"`{p}`" for p in rows[0]["per_prompt"]) + ".",
              "", "Reproduce: `python benchmarks/bench_gate_input.py --write` (with the test environment's python)."]
    body = "\n".join(lines)
    publish(log, HEADING, body, args.write)
    return 0 if all(abs(row["gate_input"] - 1) < GOAL for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

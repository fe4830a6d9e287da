"""Training-step cost of Perfusion against textual inversion (only the word vector), same model, one run.

Each variant runs in its own fresh process (so peak memory is its own): a full-size SD1.5 UNet and a
full-size CLIP-L with random weights, float32, batch 1 at 256x256 (latent 32x32) on the CPU, or on the
GPU where one is present (`--device cuda`; the reference recipe's run is `--steps 400 --batch 4`).

    python benchmarks/bench_train.py [--steps 4] [--write]
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time

from common import boot_comfyui, environment, median, publish

log = logging.getLogger("bench_train")
HEADING = "## Train: step time and peak memory, Perfusion vs textual inversion"


def run_variant(variant: str, steps: int, batch: int, size: int, device: str) -> dict:
    """One variant in this process: returns median step seconds and the peak memory training added."""
    host = boot_comfyui(cpu=device == "cpu")
    import torch
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base as smb
    from bench_apply import build_model, init_random
    from perfusion_ops.train import TrainSettings, train_concept

    model = build_model("sd15")
    init_random(model.diffusion_model)
    dev = torch.device(device)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))
    clip = comfy.sd.CLIP(smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                         embedding_directory=[], model_options={"dtype": torch.float32})
    init_random(clip.cond_stage_model)
    latents = torch.randn(4, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    C = torch.eye(768, dtype=torch.float64)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stamps = []
    settings = TrainSettings(steps=steps, seed=0, batch_size=batch, train_values=variant == "perfusion")
    train_concept(patcher, clip, latents, "sks", "teddy", C, "bench", settings,
                  on_step=lambda step, loss, x0: stamps.append(time.perf_counter()))
    step_times = [b - a for a, b in zip(stamps, stamps[1:])][1:]  # the first steps warm up
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) * 1024)
    return {"variant": variant, "median_step_s": median(step_times), "steps_timed": len(step_times),
            "peak_bytes": peak, "total_s": stamps[-1] - stamps[0], "comfyui": str(host)}


def in_subprocess(variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps), "--batch", str(args.batch),
           "--size", str(args.size), "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both variants")
    parser.add_argument("--write", action="store_true", help="write the figures into benchmarks/RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.stdout.write(json.dumps(run_variant(args.child, args.steps, args.batch, args.size, args.device)) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = {"perfusion": [], "textual_inversion": []}
    for round_ in range(args.rounds):
        for variant in (results if round_ % 2 == 0 else reversed(list(results))):
            results[variant].append(in_subprocess(variant, args))
            log.info("round %d %s: %s", round_ + 1, variant, results[variant][-1])
    step = {v: median([r["median_step_s"] for r in rs]) for v, rs in results.items()}
    peak = {v: median([r["peak_bytes"] for r in rs]) for v, rs in results.items()}
    env = environment(boot_comfyui(cpu=args.device == "cpu"))
    body = (f"Measured {env['date']} on {env['machine']}, torch {env['torch']}, ComfyUI {env['ComfyUI']}; "
            f"full-size SD1.5 UNet + CLIP-L with random weights, float32, batch {args.batch}, {args.size}x{args.size}, "
            f"{args.steps} steps per run (first timed step dropped as warm-up), {args.rounds} alternating rounds, "
            "each run in a fresh process.\n\n"
            "| variant | median step | peak memory added by training |\n|---|---|---|\n"
            + "".join(f"| {v} | {step[v]:.2f} s | {peak[v] / 2**20:.0f} MiB |\n" for v in results)
            + f"\nRatio Perfusion / textual inversion: time **{step['perfusion'] / step['textual_inversion']:.3f}x**, "
              f"peak memory **{peak['perfusion'] / peak['textual_inversion']:.3f}x** (target at most 1.10x for both). "
              f"Peak memory on the CPU is the growth of the process's maximum resident set during training.\n\n"
              f"Reproduce: `python benchmarks/bench_train.py --write` (with the test environment's python).")
    publish(log, HEADING, body, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())

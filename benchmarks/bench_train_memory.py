"""Peak memory and step time of one training step on full-size architectures (random weights), with gradient
checkpointing on and off, in one run: SD1.5 at 512² batch 4 and SDXL at 1024² batch 1.

Each (architecture, checkpointing) runs in a fresh process, so its peak is its own. On the CPU the peak is the
growth of the process's maximum resident set during training (the model and CLIP are built before it is read),
in float32 (CPUs have no fast float16); on a GPU (`--device cuda`) it is torch's peak allocated memory over the
whole run, with the UNet and CLIP loaded in `--dtype` (float16 by default, as ComfyUI loads them there).

    python benchmarks/bench_train_memory.py [--arch sd15 sdxl] [--steps 2] [--write]
    python benchmarks/bench_train_memory.py --device cuda --steps 400 --write   # the reference recipe on a GPU
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

log = logging.getLogger("bench_train_memory")
HEADING = "## Train: peak memory and step time with and without gradient checkpointing"
SETUPS = {"sd15": {"size": 512, "batch": 4, "clip": "sd1"}, "sdxl": {"size": 1024, "batch": 1, "clip": "sdxl"}}


def _clip(arch: str, dtype):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base as smb
    target = smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel) if arch == "sd15" else \
        smb.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    return comfy.sd.CLIP(target, embedding_directory=[], model_options={"dtype": dtype})


def run_variant(arch: str, checkpointing: bool, steps: int, device: str, dtype_name: str) -> dict:
    """One training run in this process: median step time (first step dropped) and peak memory."""
    boot_comfyui(cpu=device == "cpu")
    import torch
    import comfy.model_patcher
    from bench_apply import build_model, init_random
    from perfusion_ops.concept import ARCHITECTURES
    from perfusion_ops.train import TrainSettings, train_concept
    dtype = getattr(torch, dtype_name)
    setup = SETUPS[arch]
    model = build_model(arch, dtype=dtype)
    init_random(model.diffusion_model)
    dev = torch.device(device)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))
    clip = _clip(arch, dtype)
    init_random(clip.cond_stage_model)
    latents = torch.randn(setup["batch"], 4, setup["size"] // 8, setup["size"] // 8,
                          generator=torch.Generator().manual_seed(0))
    d = ARCHITECTURES["sd1" if arch == "sd15" else "sdxl"]["context_dim"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stamps = [time.perf_counter()]
    settings = TrainSettings(steps=steps, seed=0, batch_size=setup["batch"], gradient_accumulation=1,
                             gradient_checkpointing=checkpointing)
    train_concept(patcher, clip, latents, "sks", "teddy", torch.eye(d, dtype=torch.float64), "bench", settings,
                  on_step=lambda step, loss, x0: stamps.append(time.perf_counter()))
    step_times = [b - a for a, b in zip(stamps, stamps[1:])]
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) * 1024)
    return {"arch": arch, "checkpointing": checkpointing, "step_s": median(step_times[1:] or step_times),
            "steps": len(step_times), "total_s": stamps[-1] - stamps[0], "peak_bytes": peak,
            "model_dtype": dtype_name, "device": device}


def _total_memory_gib() -> float:
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def in_subprocess(arch: str, checkpointing: bool, args) -> dict:
    cmd = [sys.executable, __file__, "--child", arch, str(int(checkpointing)), "--steps", str(args.steps),
           "--device", args.device, "--dtype", args.dtype]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode < 0:  # killed: on Linux a SIGKILL here is the kernel's out-of-memory killer
        why = "killed by SIGKILL (out of memory)" if result.returncode == -9 else f"killed by signal {-result.returncode}"
        return {"arch": arch, "checkpointing": checkpointing, "failed": why}
    if result.returncode != 0:
        return {"arch": arch, "checkpointing": checkpointing, "failed": result.stderr.strip().splitlines()[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default: float32 on the CPU, float16 on a GPU)")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "float16")
    if args.child:
        result = run_variant(args.child[0], bool(int(args.child[1])), args.steps, args.device, args.dtype)
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for arch in args.arch:
        for checkpointing in (True, False):
            rows.append(in_subprocess(arch, checkpointing, args))
            log.info("%s", rows[-1])
    env = environment(boot_comfyui(cpu=args.device == "cpu"))
    for arch in args.arch:  # one section per model, so that each can be measured on its own
        body = _section([row for row in rows if row["arch"] == arch], env, args)
        publish(log, f"{HEADING}: {arch}", body, args.write)
    return 0


def _section(rows: list[dict], env: dict, args) -> str:
    lines = [f"Measured {env['date']} on {env['machine']}, torch {env['torch']} ({env['torch threads']} threads), "
             f"ComfyUI {env['ComfyUI']}; full-size UNet and text encoders with random weights, model in {args.dtype} "
             f"on {args.device}, {args.steps} training steps per run (one micro-batch each; the first step is not "
             "timed), each run in a fresh process. Peak memory: " + (
                 "torch's peak allocated GPU memory." if args.device == "cuda" else
                 "growth of the process's maximum resident set during training (the weights themselves are "
                 "resident before it is read)."), "",
             "| model | setting | gradient checkpointing | step time | peak memory |", "|---|---|---|---|---|"]
    for row in rows:
        setup = SETUPS[row["arch"]]
        setting = f"{setup['size']}², batch {setup['batch']}"
        if "failed" in row:
            lines.append(f"| {row['arch']} | {setting} | {'on' if row['checkpointing'] else 'off'} | failed: "
                         f"{row['failed'][:80]} | |")
            continue
        lines.append(f"| {row['arch']} | {setting} | {'on' if row['checkpointing'] else 'off'} | "
                     f"{row['step_s']:.1f} s | {row['peak_bytes'] / 2**30:.2f} GiB |")
    lines += ["", f"Machine memory: {_total_memory_gib():.0f} GiB. Reproduce: `python benchmarks/bench_train_memory.py "
              f"--arch {rows[0]['arch']} --dtype {args.dtype} --write` (with the test environment's python); on a GPU "
              "add `--device cuda`."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

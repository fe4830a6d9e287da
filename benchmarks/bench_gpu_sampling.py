"""Sampling time with Perfusion against the unpatched model where users sample: on a GPU, in float16, at SD1.5
512² and SDXL 1024², with 1 and 4 concepts, with and without torch.compile; one run, interleaved A/B ratios.

Full-size UNets with random weights (ComfyUI's own configs), contexts of the sampler's shape, ComfyUI's sampler
(euler, 20 steps, cfg 5). Variants of each setting are timed in turn (A B C A B C ...) so that drift falls on all
alike; the figure is the ratio of medians to the unpatched model. With `--compile` every variant is also run
through the stock TorchCompileModel node (inductor), after one untimed warm-up run that compiles it.
Goals (issue 17): ≤ 1.01x for one concept, ≤ 1.03x for four.

    python benchmarks/bench_gpu_sampling.py --compile --write          # on a GPU: the whole table
    python benchmarks/bench_gpu_sampling.py --device cpu --dtype float32 --arch sd15 --size 128 --steps 2 \\
        --repetitions 2                                                 # a quick check that the script runs
"""
from __future__ import annotations

import argparse
import logging
import sys

from common import boot_comfyui, environment, init_random, interleaved, markdown_table, median, publish

log = logging.getLogger("bench_gpu_sampling")
HEADING = "## Apply: sampling time on a GPU (float16), with and without torch.compile"
SETUPS = {"sd15": {"arch": "sd1", "size": 512, "context": 768}, "sdxl": {"arch": "sdxl", "size": 1024, "context": 2048}}
GOALS = {1: 1.01, 4: 1.03}


def bench(name: str, args) -> list[dict]:
    import torch
    import comfy.model_patcher
    import comfy.sample
    import nodes
    from bench_apply import build_model, random_concept
    from perfusion_ops.patch import apply_concepts
    setup = SETUPS[name]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build_model(name, dtype=dtype)
    init_random(model.diffusion_model, seed=0)
    base = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    positive = torch.randn(1, 77, setup["context"], generator=g)
    negative = torch.randn(1, 77, setup["context"], generator=g)
    extra = {}
    if setup["arch"] == "sdxl":  # SDXL's pooled text and size conditioning
        extra = {"pooled_output": torch.randn(1, 1280, generator=g), "width": args.size or setup["size"],
                 "height": args.size or setup["size"]}
    concepts = [random_concept(model.diffusion_model, setup["arch"], f"c{i}", seed=2 + i, context=positive,
                               position=4 + i) for i in range(4)]
    size = (args.size or setup["size"]) // 8
    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, args.seed)

    def sample(model_patcher):
        with torch.inference_mode():
            out = comfy.sample.sample(model_patcher, noise, args.steps, 5.0, "euler", "normal",
                                      [[positive, dict(extra)]], [[negative, dict(extra)]], latent, seed=args.seed,
                                      disable_pbar=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    variants = {"unpatched": base, "1 concept": apply_concepts(base, concepts[:1]),
                "4 concepts": apply_concepts(base, concepts)}
    rows = []
    for compiled in ([False, True] if args.compile else [False]):
        timed = variants
        if compiled:
            compile_node = nodes.NODE_CLASS_MAPPINGS["TorchCompileModel"]
            timed = {label: compile_node.execute(m, "inductor")[0] for label, m in variants.items()}
            for m in timed.values():
                sample(m)  # compiles
        wall, _ = interleaved({label: (lambda m=m: sample(m)) for label, m in timed.items()}, args.repetitions,
                              warmup=1, log=log)
        for label in ("1 concept", "4 concepts"):
            rows.append({"model": name, "size": size * 8, "compiled": compiled, "variant": label,
                         "unpatched_s": median(wall["unpatched"]), "patched_s": median(wall[label]),
                         "ratio": median(wall[label]) / median(wall["unpatched"])})
            log.info("%s", rows[-1])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--size", type=int, default=0, help="image side in pixels (default: 512 SD1.5, 1024 SDXL)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="also time every variant under TorchCompileModel")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host = boot_comfyui(cpu=args.device == "cpu")
    rows = [row for name in args.arch for row in bench(name, args)]
    env = environment(host)
    lines = [f"Measured {env['date']} on {env['machine']}, torch {env['torch']}, ComfyUI {env['ComfyUI']}; "
             f"{args.dtype} on {args.device}, euler {args.steps} steps, cfg 5, batch 1, {args.repetitions} interleaved "
             "repetitions after a warm-up; ratio of medians to the unpatched model in the same run.", ""]
    goal = lambda r: GOALS[int(r["variant"][0])]  # noqa: E731
    lines += markdown_table(
        ["model", "image", "torch.compile", "concepts", "unpatched", "patched", "ratio", "goal"],
        [[r["model"], f"{r['size']}²", "inductor" if r["compiled"] else "no", r["variant"], f"{r['unpatched_s']:.3f} s",
          f"{r['patched_s']:.3f} s", f"{r['ratio']:.3f}x", f"{'met' if r['ratio'] <= goal(r) else 'missed'} (≤ {goal(r)}x)"]
         for r in rows])
    lines += ["", "Reproduce: `python benchmarks/bench_gpu_sampling.py --compile --write` (with the test environment's "
              "python, on a machine with a CUDA GPU)."]
    publish(log, HEADING, "\n".join(lines), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())

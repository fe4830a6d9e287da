"""Combine benchmark: sampling time with 4 concepts applied jointly against the unpatched model.

    ~/.cache/comfyui-perfusion/venv/bin/python benchmarks/bench_combine.py [--repetitions 5] [--threads 1] [--write]

A full-size SD1.5 UNet (ComfyUI's own SD15 config as comfy/model_detection.py gives it: model_channels 320,
channel_mult [1,2,4,4], num_res_blocks 2, transformer_depth [1,1,1,1,1,1,0,0], 16 cross-attention layers,
~860 M parameters; random float32 weights; CPU) sampled with comfy.sample.sample (euler, 4 steps, cfg 5,
256x256 -> 32x32 latent, batch 1; cfg runs cond and uncond as one batch of 2) from random [1, 77, 768]
text contexts. Variants: the unpatched model, and clones with 4 concepts applied through
perfusion_ops.patch.apply_concepts (what the Apply node does with a Combine set) in exact and in approximate
mode. Each concept's i* is a different token of the positive context, so every gate opens on its own token.
Same seeds for every variant; warm-up rounds, then interleaved repetitions (order rotated each round);
medians and their ratio, of wall time and of this process's CPU time (with one torch thread, the default, CPU
time stays meaningful when other jobs share the machine). Target: patched / unpatched <= 1.05.

--write puts the figures into the section "## Combine: sampling time with 4 concepts" of benchmarks/RESULTS.md
(replacing that section if present, appending it otherwise; other sections stay as they are).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## Combine: sampling time with 4 concepts"
TARGET = 1.05
N_CONCEPTS = 4

# comfy/model_detection.py (unet_config_from_diffusers_unet, "SD15"), without dtype. supported_models.SD15
from bench_apply import build_model  # noqa: E402  (after the constants above)
from common import add_sampling_options, boot_comfyui, hook_timer, init_random, machine, write_results_section  # noqa: E402

log = logging.getLogger("bench_combine")


# ---------------------------------------------------------------- host

def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


# ---------------------------------------------------------------- model and concepts

def build_sd15():
    import torch
    import comfy.model_patcher
    cpu = torch.device("cpu")
    model = build_model("sd15")
    init_random(model.diffusion_model, seed=0)
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def concepts_on_tokens(diffusion_model, context, positions):
    """One concept per position: i* = that context token, u = C⁻¹ i* with C the context's second moment plus
    a ridge (as tests/reference.py random_concept), random value targets, locked keys."""
    import torch
    from perfusion_ops.concept import Concept
    from perfusion_ops.patch import cross_attention_layers
    layers = cross_attention_layers(diffusion_model)
    X = context[0].double()
    d = X.shape[1]
    C = X.T @ X / X.shape[0] + 0.01 * (X * X).sum() / X.shape[0] / d * torch.eye(d, dtype=torch.float64)
    concepts = []
    for n, p in enumerate(positions):
        g = torch.Generator().manual_seed(100 + n)
        i_star = context[0, p].float().clone()
        concepts.append(Concept(
            name=f"concept{n + 1}", superclass="teddy", arch="sd1",
            embeddings={"clip_l": torch.randn(1, 768, generator=g)},
            i_star=i_star, u=torch.linalg.solve(C, i_star.double()).float(), i_super=torch.randn(d, generator=g),
            values={path: torch.randn(m.to_v.out_features, generator=g) for path, m in layers.items()},
            covariance="bench"))
    return concepts


# ---------------------------------------------------------------- timing

def interleaved(runs: dict, repetitions: int, warmup: int) -> tuple[dict, dict]:
    """`warmup` untimed rounds, then `repetitions` rounds timing every variant once, order rotated each round.
    Returns (wall seconds, process CPU seconds), each name -> list. On a machine shared with other jobs the CPU
    time of this process is the steadier measure; wall time is what a user waits."""
    names = list(runs)
    for w in range(warmup):
        for name in names:
            start = time.perf_counter()
            runs[name]()
            log.info("  warm-up %d  %-13s %.3f s", w + 1, name, time.perf_counter() - start)
    wall, cpu = {name: [] for name in names}, {name: [] for name in names}
    for rep in range(repetitions):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            log.info("  round %d    %-13s wall %.3f s, cpu %.3f s  (load %s)", rep + 1, name, wall[name][-1],
                     cpu[name][-1], load_average())
    return wall, cpu


def time_hooks(sample, model_patcher) -> tuple[float, int, float]:
    """One more sample of `model_patcher` with every Perfusion forward hook timed (common.hook_timer). Returns
    (seconds in hooks, hook calls, seconds for the whole sample)."""
    with hook_timer({}) as totals:
        start = time.perf_counter()
        sample(model_patcher)
        whole = time.perf_counter() - start
    return totals["wall"], totals["calls"], whole


def bench(args) -> dict:
    import torch
    import comfy.sample
    from perfusion_ops.patch import apply_concepts, cross_attention_layers

    start = time.perf_counter()
    base = build_sd15()
    diffusion_model = base.model.diffusion_model
    n_params = sum(p.numel() for p in diffusion_model.parameters())
    n_layers = len(cross_attention_layers(diffusion_model))
    log.info("SD1.5 UNet: %.1f M parameters, %d cross-attention layers, built in %.1f s",
             n_params / 1e6, n_layers, time.perf_counter() - start)

    g = torch.Generator().manual_seed(1)
    positive_context, negative_context = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    concepts = concepts_on_tokens(diffusion_model, positive_context, positions=range(1, N_CONCEPTS + 1))
    variants = {"unpatched": base}
    for mode in args.modes:
        variants[f"4 {mode}"] = apply_concepts(base, concepts, 1.0, exact=mode == "exact")

    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, args.seed)
    outputs: dict = {}

    def sample(model_patcher):
        with torch.inference_mode():
            return comfy.sample.sample(model_patcher, noise, args.steps, args.cfg, "euler", "normal",
                                       [[positive_context, {}]], [[negative_context, {}]], latent,
                                       seed=args.seed, disable_pbar=True)

    def runner(name, model_patcher):
        def run():
            outputs.setdefault(name, []).append(sample(model_patcher))
        return run

    log.info("Sampling %dx%d (latent %dx%d), euler, %d steps, cfg %g, torch threads %d; %d warm-up round(s), "
             "%d interleaved repetitions of: %s", args.size, args.size, args.size // 8, args.size // 8, args.steps,
             args.cfg, torch.get_num_threads(), args.warmup, args.repetitions, ", ".join(variants))
    load_before = load_average()
    times, cpu_times = interleaved({name: runner(name, m) for name, m in variants.items()}, args.repetitions,
                                   args.warmup)
    load_after = load_average()
    hooks = {}
    for name, model_patcher in variants.items():
        if name != "unpatched":
            hooks[name] = time_hooks(sample, model_patcher)
            log.info("%s: %d hook calls took %.3f s of a %.3f s sample (%.2f%%)", name, hooks[name][1],
                     hooks[name][0], hooks[name][2], 100 * hooks[name][0] / hooks[name][2])

    base_latent = outputs["unpatched"][0]
    result = {"params": n_params, "layers": n_layers, "times": times, "cpu_times": cpu_times,
              "load": (load_before, load_after),
              "threads": torch.get_num_threads(), "hooks": hooks, "variants": {}}
    for name in variants:
        deterministic = all(torch.equal(outputs[name][0], o) for o in outputs[name])
        effect = float((outputs[name][0] - base_latent).norm() / base_latent.norm())
        t, c = times[name], cpu_times[name]
        result["variants"][name] = {
            "median": statistics.median(t), "min": min(t), "max": max(t), "deterministic": deterministic,
            "effect": effect,
            "ratio": statistics.median(t) / statistics.median(times["unpatched"]),
            "ratio_min": min(t) / min(times["unpatched"]),
            "per_round_ratio": statistics.median(a / b for a, b in zip(t, times["unpatched"])),
            "cpu_median": statistics.median(c), "cpu_min": min(c),
            "cpu_ratio": statistics.median(c) / statistics.median(cpu_times["unpatched"]),
            "cpu_ratio_min": min(c) / min(cpu_times["unpatched"]),
        }
    return result


# ---------------------------------------------------------------- report

def report(result: dict, args, command: str) -> str:
    import torch
    lines = [
        f"Measured {datetime.date.today().isoformat()} on a 2-core CPU, no GPU ({machine()}; "
        f"shared with other jobs: load average {result['load'][0]} before, {result['load'][1]} after); "
        f"torch {torch.__version__} ({result['threads']} threads), Python {platform.python_version()}, "
        "ComfyUI v0.3.64. Reproduce with:",
        "",
        f"    {command}",
        "",
        f"Full-size SD1.5 UNet ({result['params'] / 1e6:.0f} M parameters, {result['layers']} cross-attention "
        f"layers, ComfyUI's SD15 config, random float32 weights, CPU), `comfy.sample.sample` euler, {args.steps} "
        f"steps, cfg {args.cfg:g}, {args.size}x{args.size} (latent {args.size // 8}x{args.size // 8}), batch 1, "
        f"random [1, 77, 768] contexts. {N_CONCEPTS} concepts applied jointly with `apply_concepts` (as the Apply "
        "node does with a Combine set), each concept's i* a different token of the positive context. Same seeds; "
        f"{args.warmup} warm-up round(s), then {args.repetitions} interleaved repetitions of each variant.",
        "",
        "Wall time (what a user waits) and this process's CPU time (with one torch thread the steadier measure "
        "when other jobs share the cores; with more threads it also counts OpenMP's spin-waiting):",
        "",
        "| variant | wall median | wall min | wall max | ratio of wall medians | ratio of wall minima | "
        "median per-round wall ratio | CPU median | ratio of CPU medians | ratio of CPU minima |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['median']:.3f} s | {v['min']:.3f} s | {v['max']:.3f} s | {v['ratio']:.4f} | "
                     f"{v['ratio_min']:.4f} | {v['per_round_ratio']:.4f} | {v['cpu_median']:.3f} s | "
                     f"{v['cpu_ratio']:.4f} | {v['cpu_ratio_min']:.4f} |")
    lines.append("")
    spread = max(v["max"] / v["min"] for v in result["variants"].values())
    for name, v in result["variants"].items():
        if name == "unpatched":
            continue
        lines.append(f"- **{name}: {v['ratio']:.4f}x** the unpatched wall-time median, **{v['cpu_ratio']:.4f}x** "
                     f"its CPU-time median (target <= {TARGET}: wall {'met' if v['ratio'] <= TARGET else 'MISSED'}, "
                     f"CPU {'met' if v['cpu_ratio'] <= TARGET else 'MISSED'}); the concepts change the latent by "
                     f"{v['effect']:.3f} (relative L2); same seeds give bit-identical latents run to run: "
                     f"{v['deterministic']}.")
    if spread > 1.15:
        lines.append(f"- Other jobs shared the cores during this run (the slowest wall time of a variant is up to "
                     f"{spread:.2f}x its fastest), so the wall-time ratios say little; "
                     + ("the CPU-time ratios (one thread) hold." if result["threads"] == 1 else
                        "with several threads the CPU times are disturbed too: rerun with --threads 1."))
    for name, (seconds, calls, whole) in result["hooks"].items():
        lines.append(f"- {name}: the Perfusion hooks themselves (timed in one more sample) took "
                     f"{seconds * 1000:.1f} ms over {calls} calls, {100 * seconds / whole:.2f}% of that {whole:.2f} s sample: the edit's own "
                     "cost, whatever the noise in the ratios above.")
    lines.append(f"- Unpatched run to run bit-identical: {result['variants']['unpatched']['deterministic']}.")
    for label, key in (("wall", "times"), ("CPU", "cpu_times")):
        lines.append(f"- All {label} timings (s): " + "; ".join(
            f"{name} " + ", ".join(f"{t:.3f}" for t in ts) for name, ts in result[key].items()) + ".")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_options(parser, repetitions=5)
    parser.add_argument("--modes", default="exact,approximate", help="multi-concept modes to time, comma-separated")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default). 1 by default: on a small machine shared with other "
                             "jobs, more threads spin-wait for each other and the timings scatter")
    parser.add_argument("--write", action="store_true", help=f"write the figures into {SECTION!r} of RESULTS.md")
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    if not set(args.modes) <= {"exact", "approximate"}:
        parser.error("--modes takes exact and/or approximate")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    boot_comfyui()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.INFO)  # ComfyUI's import may have changed the root level

    result = bench(args)
    command = " ".join(["~/.cache/comfyui-perfusion/venv/bin/python", "benchmarks/bench_combine.py",
                        *(a for a in sys.argv[1:] if a != "--write")])
    text = report(result, args, command)
    log.info("report:\n%s", text)
    if args.write:
        write_results_section(SECTION, text)
        log.info("wrote the section %r of %s", SECTION, RESULTS)
    summary = ", ".join(f"{name} {v['ratio']:.4f}x (CPU {v['cpu_ratio']:.4f}x)"
                        for name, v in result["variants"].items() if name != "unpatched")
    log.info("SUMMARY: unpatched median %.3f s; 4 concepts: %s (target <= %.2f)",
             result["variants"]["unpatched"]["median"], summary, TARGET)
    return 0


if __name__ == "__main__":
    sys.exit(main())

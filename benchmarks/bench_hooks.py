"""What one Perfusion hook call costs by itself: the ops it dispatches (torch profiler) and its wall time.

The hooks are called directly on the cross-attention to_k / to_v of ComfyUI's full-size SD1.5 or SDXL UNet
(random weights; nothing else of the UNet runs, so the UNet's own cost is zero here), with a context of the
sampler's shape (batch 2: conditional and unconditional, 77 tokens), for 1 and 4 concepts in exact mode. On a
GPU (`--device cuda`) the profiler also counts the kernels launched per call, the figure that matters there.

    python benchmarks/bench_hooks.py [--arch sd15 sdxl] [--device cpu|cuda] [--dtype float32|float16] [--write]
    python benchmarks/bench_hooks.py --baseline REV   # also the same measurement of the pack at git revision REV
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, boot_comfyui, environment, markdown_table, median, publish

log = logging.getLogger("bench_hooks")
HEADING = "## Apply: ops and time per hook call"
CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}
# Ops that only make views, allocate or do nothing (a `to` of a tensor already in that dtype): no kernel on a GPU.
NO_COMPUTE = {"aten::view", "aten::select", "aten::flatten", "aten::numpy_T", "aten::t", "aten::transpose",
              "aten::unsqueeze", "aten::reshape", "aten::_reshape_alias", "aten::alias", "aten::expand",
              "aten::as_strided", "aten::slice", "aten::detach", "aten::to", "aten::_unsafe_view", "aten::empty",
              "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh"}


def computes(event) -> bool:
    """An op that does the computing itself: not a view or no-op, and no op inside it computes."""
    inner = [child for child in event.cpu_children if child.name.startswith("aten::")]
    return event.name not in NO_COMPUTE and not any(child.name not in NO_COMPUTE for child in inner)


def measure(arch: str, concepts: int, device: str, dtype_name: str, iterations: int) -> dict:
    import torch
    from bench_apply import build_model, random_concept
    from perfusion_ops.concept import INFERENCE_BETA, INFERENCE_TAU
    from perfusion_ops.patch import AppliedConcept, ConceptTensors, cross_attention_layers
    dtype = getattr(torch, dtype_name)
    unet = build_model(arch, "meta").diffusion_model
    layers = cross_attention_layers(unet)
    # Only the projections are materialised (random weights); the rest of the UNet stays on the meta device.
    projections = []
    for path, attn in layers.items():
        for kind in ("to_k", "to_v"):
            meta = getattr(attn, kind)
            linear = torch.nn.Linear(meta.in_features, meta.out_features, bias=False, device=device, dtype=dtype)
            torch.nn.init.normal_(linear.weight, std=0.02)
            projections.append((path, kind, linear))
    applied = [AppliedConcept(random_concept(unet, "sd1" if arch == "sd15" else "sdxl", f"c{i}", seed=i), 1.0,
                              INFERENCE_BETA, INFERENCE_TAU) for i in range(concepts)]
    tensors = ConceptTensors(applied, exact=True, device=torch.device(device))
    x = torch.randn(2, 77, CONTEXT_DIM[arch], device=device, dtype=dtype)
    calls = [(linear, (tensors.key_hook if kind == "to_k" else tensors.value_hook)(path)) for path, kind, linear in projections]
    outputs = [linear(x) for linear, _ in calls]

    def run_hooks():
        for (linear, hook), output in zip(calls, outputs):
            hook(linear, (x,), output)

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        run_hooks()  # warm-up
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch.profiler.profile(activities=activities) as profile:
            run_hooks()
            synchronize()
        events = [e for e in profile.events() if e.device_type.name == "CPU" and e.name.startswith("aten::")]
        top_level = sum(1 for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        compute = sum(1 for e in events if computes(e))
        kernels = sum(1 for e in profile.events() if e.device_type.name == "CUDA")
        seconds = []
        for _ in range(iterations):
            synchronize()
            start = time.perf_counter()
            run_hooks()
            synchronize()
            seconds.append(time.perf_counter() - start)
    return {"arch": arch, "concepts": concepts, "hooks": len(calls), "ops": len(events) / len(calls),
            "top_level_ops": top_level / len(calls), "compute_ops": compute / len(calls), "kernels": kernels / len(calls),
            "microseconds": median(seconds) / len(calls) * 1e6}


def baseline_rows(revision: str, args) -> list[dict]:
    """The same measurement of the pack as it was at `revision`: this script, run in a temporary git worktree
    of that revision, in a fresh process."""
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(tree), revision], check=True)
        try:
            shutil.copy(__file__, tree / "benchmarks" / Path(__file__).name)
            command = [sys.executable, str(tree / "benchmarks" / Path(__file__).name), "--json", "--arch", *args.arch,
                       "--device", args.device, "--dtype", args.dtype, "--iterations", str(args.iterations),
                       "--threads", str(args.threads)]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=list(CONTEXT_DIM))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, float16 on a GPU")
    parser.add_argument("--iterations", type=int, default=20, help="timed passes over every hook")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: torch's default)")
    parser.add_argument("--baseline", default=None, help="git revision to measure too, in a temporary worktree")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # rows as JSON (for --baseline)
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "float16")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host = boot_comfyui(cpu=args.device == "cpu")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(arch, k, args.device, args.dtype, args.iterations) for arch in args.arch for k in (1, 4)]
    if args.json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return 0
    for row in rows:
        row["version"] = "this tree"
    if args.baseline:
        for row in baseline_rows(args.baseline, args):
            rows.append({**row, "version": args.baseline})
    env = environment(host)
    lines = [f"Measured {env['date']} on {env['machine']}, torch {env['torch']} ({torch.get_num_threads()} threads), "
             f"ComfyUI {env['ComfyUI']}; {args.dtype} on {args.device}. Every hook of the UNet called directly on a "
             "[2, 77, d] context (the UNet itself does not run); exact mode. `ops` counts every aten op the profiler "
             "records per hook call (nested ones included), `top-level` only those the hook's own Python calls, "
             "`compute` the innermost ops that compute (views, allocations and no-op casts left out: about the kernels "
             "a GPU would launch); `kernels` the GPU kernels launched per call.", ""]
    lines += markdown_table(
        ["pack", "model", "concepts", "hooks per UNet call", "ops per hook", "top-level", "compute", "kernels",
         "time per hook"],
        [[r["version"], r["arch"], r["concepts"], r["hooks"], f"{r['ops']:.1f}", f"{r['top_level_ops']:.1f}",
          f"{r['compute_ops']:.1f}", f"{r['kernels']:.1f}" if args.device == "cuda" else "(CPU)",
          f"{r['microseconds']:.0f} µs"] for r in rows])
    reproduce = ("Reproduce: `python benchmarks/bench_hooks.py --baseline REV --write` (with the test environment's "
                 "python); on a GPU add `--device cuda`.")
    publish(log, HEADING, "\n".join(lines + ["", reproduce]), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())

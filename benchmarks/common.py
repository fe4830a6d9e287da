"""Helpers shared by the benchmark scripts: boot ComfyUI as a library, describe the machine, time things,
and write one section of benchmarks/RESULTS.md without touching the others.

    from common import boot_comfyui     # run the scripts as `python benchmarks/<script>.py`
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # support/ and perfusion_ops/, after ComfyUI (support/__init__.py says why)
from support.tiny_models import init_random  # noqa: E402,F401  (re-exported: one weight initialisation for tests and benchmarks)
RESULTS = REPO / "benchmarks" / "RESULTS.md"
RESULTS_TITLE = "# Benchmark results\n\nFigures measured by the scripts in `benchmarks/`; each section says how to reproduce it.\n"


def boot_comfyui(cpu: bool = True) -> Path:
    """Put ComfyUI (found as the tests find it) first on sys.path and the pack's repository after it,
    so `import comfy...` and `import perfusion_ops...` both work and the pack's `nodes/` folder does not
    shadow ComfyUI's `nodes` module. With `cpu`, ComfyUI runs on the CPU (set before model_management loads)."""
    from support import comfy_host
    host = comfy_host.required_comfyui(REPO)
    comfy_host.prepare(host, cpu=cpu)
    return host


def comfyui_version(host: Path) -> str:
    match = re.search(r'__version__\s*=\s*"([^"]+)"', (host / "comfyui_version.py").read_text()) \
        if (host / "comfyui_version.py").is_file() else None
    return match.group(1) if match else "unknown"


def machine() -> str:
    """E.g. '2-core CPU, no GPU' (what torch sees), plus the CPU model when known."""
    import torch
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = " (" + line.split(":", 1)[1].strip() + ")"
                break
    except OSError:
        pass
    return f"{cores}-core CPU{model}, {gpu}"


def environment(host: Path) -> dict[str, str]:
    import torch
    return {"date": datetime.date.today().isoformat(), "machine": machine(), "torch": torch.__version__,
            "torch threads": str(torch.get_num_threads()), "python": platform.python_version(),
            "ComfyUI": comfyui_version(host)}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (other jobs sharing the cores), or '?'."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def interleaved(runs: dict, repetitions: int, warmup: int = 1, log=None) -> tuple[dict, dict]:
    """Time each of `runs` (name -> zero-argument callable) `repetitions` times, alternating between them
    (A B A B ..., order rotated each round) after `warmup` untimed rounds, so drift and other load on the
    machine fall on every variant alike. Returns (wall seconds, this process's CPU seconds), each a dict
    name -> list."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for rep in range(repetitions):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            start_cpu = time.process_time()
            seconds, _ = timed(runs[name])
            wall[name].append(seconds)
            cpu[name].append(time.process_time() - start_cpu)
            if log is not None:
                log.info("  round %d  %-10s wall %.3f s  cpu %.3f s  (load %s)", rep + 1, name, seconds,
                         cpu[name][-1], loadavg())
    return wall, cpu


def add_sampling_options(parser, repetitions: int) -> None:
    """The command-line options of the sampling benchmarks: how often, and what each sample is."""
    parser.add_argument("--repetitions", type=int, default=repetitions, help="timed repetitions of each variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (the latent is size/8)")
    parser.add_argument("--seed", type=int, default=0)


def markdown_table(columns: list[str], rows: list[list]) -> list[str]:
    """The lines of a Markdown table with these column names and rows of cells."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
        ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def publish(log, heading: str, body: str, write: bool) -> None:
    """Log a result section and, with `write`, put it into RESULTS.md under `heading`."""
    log.info("%s", body)
    if write:
        write_results_section(heading, body)


@contextlib.contextmanager
def hook_timer(totals: dict):
    """Sum the wall and CPU time spent inside the Perfusion hooks during the block, without touching
    perfusion_ops' files: ConceptTensors's hook factories are wrapped for the duration of the block."""
    from perfusion_ops import patch
    originals = {name: getattr(patch.ConceptTensors, name) for name in ("key_hook", "value_hook")}
    totals.update(wall=0.0, cpu=0.0, calls=0)

    def wrap(factory):
        def timed_factory(self, path):
            hook = factory(self, path)

            def timed_hook(module, inputs, output):
                wall, cpu = time.perf_counter(), time.process_time()
                try:
                    return hook(module, inputs, output)
                finally:
                    totals["wall"] += time.perf_counter() - wall
                    totals["cpu"] += time.process_time() - cpu
                    totals["calls"] += 1
            return timed_hook
        return timed_factory

    for name, factory in originals.items():
        setattr(patch.ConceptTensors, name, wrap(factory))
    try:
        yield totals
    finally:
        for name, factory in originals.items():
            setattr(patch.ConceptTensors, name, factory)


def median(values) -> float:
    return statistics.median(values)


def write_results_section(heading: str, body: str, path: Path = RESULTS) -> None:
    """Replace the section that starts with the line `heading` (up to the next '## ' heading) in RESULTS.md,
    or append it; every other section is kept as it is. The file is replaced atomically."""
    heading = heading.strip()
    text = path.read_text() if path.is_file() else RESULTS_TITLE
    section = heading + "\n\n" + body.strip() + "\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + rest if rest else "")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".RESULTS.", suffix=".partial")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)

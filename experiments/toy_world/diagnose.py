"""Why the concepts trained on 2026-12-03 are not recognised where those of 2026-11-28 were (REPORT.md §8).

Three things changed between the two runs: the pack, the judges (retrained, same config) and the base model
(rebuilt, same config, 1 torch thread instead of 2). Two checks separate them, each against the 2026-11-28 run
as recorded in git (commit RUN_2026_11_28):

- judges: today's concept judge reads the images of that run's figure `contexts_tw_circle.png` (the first image
  of each of the 8 context prompts, per setting; the PNG keeps the 48x48 pixels, enlarged 2x); the recorded
  fidelity came from that run's judge over all 24 images.
- pack: the pack as of that run (commit PACK_2026_11_28, checked out into a git worktree) trains tw_circle on
  today's base with that run's recipe, through its own nodes and its own toy-world harness, and samples the
  same context prompts; today's judge reads them.

    nice -n 10 ~/.cache/comfyui-perfusion/venv/bin/python experiments/toy_world/run.py --until diagnose
"""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import cache
import report

log = logging.getLogger(__name__)

RUN_2026_11_28 = "360b028"   # the commit that recorded the 2026-11-28 run (results.json, figures)
PACK_2026_11_28 = "ccdfaee"  # the pack that trained its concepts (REPORT.md, summary of that run)
FIGURE_ROWS = ["base model, superclass word", "textual inversion", "perfusion beta 0.7 tau 0.15",
               "trained keys beta 0.7 tau 0.15", "perfusion beta 0.4 tau 0.15", "perfusion beta 1.2 tau 0.15"]
OLD_RECIPE = {"steps": 250, "seed": 0, "batch_size": 2, "resolution": 48, "value_lr": 0.03, "embedding_lr": 0.006}
CONCEPT = "tw_circle"


def _git(repo: Path, *args) -> bytes:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True).stdout


def figure_tiles(png: bytes, rows: int, columns: int = 8, caption_lines: int = 5, size: int = 48) -> np.ndarray:
    """The images of a report.image_grid sheet, [rows, columns, size, size, 3] in 0..1 (its cell geometry)."""
    from PIL import Image
    sheet = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float32) / 255
    cell_w, row_h = max(size * report.SCALE, 6 * 22) + 6, size * report.SCALE + 11 * caption_lines + 6
    return np.stack([np.stack([sheet[r * row_h: r * row_h + size * report.SCALE: report.SCALE,
                                     c * cell_w: c * cell_w + size * report.SCALE: report.SCALE]
                               for c in range(columns)]) for r in range(rows)])


def rejudge(repo: Path, judges) -> list[dict]:
    """Today's concept judge on the 2026-11-28 figure, against the fidelity that run recorded (its own judge)."""
    png = _git(repo, "show", f"{RUN_2026_11_28}:experiments/toy_world/figures/contexts_{CONCEPT}.png")
    recorded = {s["label"]: s[CONCEPT]["fidelity"] for s in
                json.loads(_git(repo, "show", f"{RUN_2026_11_28}:experiments/toy_world/results.json"))["sweeps"]}
    tiles = figure_tiles(png, len(FIGURE_ROWS))
    rows = []
    for label, images in zip(FIGURE_ROWS, tiles):
        p = judges[1].probabilities(images)[CONCEPT]
        rows.append({"setting": label, "recorded_fidelity": recorded[label], "today_fidelity": float(p.mean()),
                     "today_detected": float((p > 0.5).mean()), "images": len(images)})
    return rows


def old_pack(repo: Path, ckpt_path: Path, judge_path: Path) -> dict:
    """tw_circle trained and sampled by the pack of 2026-11-28 on today's base, judged by today's judge (cached)."""
    folder = cache.folder("oldpack", {"pack": PACK_2026_11_28, "ckpt": str(ckpt_path), "recipe": OLD_RECIPE})
    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "pack"
        _git(repo, "worktree", "add", "--detach", str(worktree), PACK_2026_11_28)
        try:
            script = ["import sys, json",
                      f"sys.path.insert(0, {str(worktree / 'experiments' / 'toy_world')!r})",
                      f"sys.argv = ['old', {str(ckpt_path)!r}, {str(folder)!r}, {str(judge_path)!r}]",
                      f"exec(compile(open({__file__!r}).read(), {__file__!r}, 'exec'), "
                      f"{{'__name__': 'old_pack_child', '__file__': {__file__!r}}})"]
            host = __import__("comfy_env").host_path()
            subprocess.run([sys.executable, "-c", "\n".join(script)], check=True, env={
                **__import__("os").environ, "COMFYUI_PATH": str(host)})
        finally:
            _git(repo, "worktree", "remove", "--force", str(worktree))
    return json.loads(result_file.read_text())


def _old_pack_child():
    """Runs inside the 2026-11-28 harness (its comfy_env, experiments, comfy_graphs come first on sys.path)."""
    import torch
    ckpt_path, folder, judge_path = (Path(a) for a in sys.argv[1:4])
    import comfy_env
    comfy_env.import_comfy()
    import comfy.cli_args
    comfy.cli_args.args.fp32_text_enc = True  # as today's harness runs the text encoder (comfy_env.boot_with_pack)
    import comfy_graphs
    import experiments
    pack = experiments._setup(ckpt_path, folder)
    experiments.prefill_covariance(pack, ckpt_path.name)
    runner = comfy_graphs.Runner()
    t0 = time.time()
    runner.run(comfy_graphs.train_graph(ckpt_path.name, CONCEPT, "circle", experiments.PHOTO_SEED, f"old/{CONCEPT}",
                                        OLD_RECIPE))
    seconds = time.time() - t0
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # today's judges module, after the old harness
    import judges as judges_module
    concept_judge = judges_module.load_judges(judge_path)[1]
    prompts = {tag: text for tag, (text, _) in experiments.context_prompts(CONCEPT).items()}  # that run's §4 prompts
    out = {"pack": PACK_2026_11_28, "recipe": OLD_RECIPE, "training_seconds": seconds,
           "torch_threads": torch.get_num_threads(), "by_beta": {}}
    for beta in (0.4, 0.7):
        applied = [{"file": f"old/{CONCEPT}_00001.safetensors", "strength": 1.0, "beta": beta, "tau": 0.15}]
        runner.run(comfy_graphs.sample_graph(ckpt_path.name, prompts, experiments.SAMPLING, applied))
        p = np.concatenate([concept_judge.probabilities(comfy_graphs.CAPTURED.pop(t))[CONCEPT] for t in prompts])
        out["by_beta"][str(beta)] = {"fidelity": float(p.mean()), "detected": float((p > 0.5).mean()), "images": len(p)}
    (folder / "result.json").write_text(json.dumps(out, indent=1))


def run_diagnose(repo: Path, ckpt_path: Path, judge_path: Path, out_dir: Path) -> dict:
    import judges as judges_module
    t0 = time.time()
    results = {"rejudge": rejudge(repo, judges_module.load_judges(judge_path)),
               "old_pack": old_pack(repo, ckpt_path, judge_path)}
    results["seconds"] = time.time() - t0
    (out_dir / "diagnose.json").write_text(json.dumps(results, indent=1))
    log.info("diagnose: %s", results)
    return results


if __name__ == "old_pack_child":
    _old_pack_child()

"""The fidelity/alignment front, with three training seeds per method (issue 20, items 3 and 4; REPORT.md §8).

The concept's four photos show it big, in the centre, on sand or snow. The prompts ask for it *small*, on
other backgrounds, left or right: an attribute of the object itself that the photos contradict, so that
alignment can fail where it costs fidelity. Size is the attribute for it in this world: the mosaic decoder keeps
it (the attribute judge reads it) and, unlike colour, it does not contradict the concept's identity (a small
lime-and-indigo circle is still the concept).

Per image: fidelity = the concept judge's probability; alignment = the attribute judge reads size, background
and position as prompted. Perfusion (locked keys) and trained keys are swept over beta (and Perfusion over tau
at beta 0.7); textual inversion has no knob (one point); the plain superclass word gives the base model's own
alignment. Every method is trained with three seeds; comparisons are made per seed and summarised over seeds.
First, the stage checks that the base model can render the concept at all (learnability); it samples the front
only if it can.

    nice -n 10 ~/.cache/comfyui-perfusion/venv/bin/python experiments/toy_world/run.py --until front [--base ...]
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

import cache
import comfy_graphs
import experiments
import world

log = logging.getLogger(__name__)

CONCEPT = "tw_circle"  # the star is not told from a circle through the mosaic decoder (REPORT.md §3, §4)
SEEDS = (0, 1, 2)
# The toy world's recipe (experiments.TRAIN) with one micro-batch per step: the 2026-11-28 run's recipe, 4x
# cheaper than the pack's default accumulation of 4 (which took 27 min per concept on one thread, §6).
TRAIN = {**experiments.TRAIN, "gradient_accumulation": 1}
METHODS = ("perfusion", "trained_keys", "ti")
BETAS = (0.4, 0.55, 0.7, 0.85, 1.0)
TAUS = (0.05, 0.3)  # Perfusion at beta 0.7, beside the sweep's tau
TAU = 0.15
# Recipes tried (Perfusion, seed 0) before the front: changes to TRAIN. The front is sampled only if one of them
# makes the concept recognisable (MIN_FIDELITY at beta 0.4 in unseen contexts), with the first that does.
# (More training is the concept of §6, 4 micro-batches per step, which learnability() reads where it exists.)
LEARNABILITY = {"": {}, "learning rates x3.3": {"value_lr": 0.1, "embedding_lr": 0.02}, "with masks": {"masks": True},
                "learning rates x3.3 and 500 steps": {"value_lr": 0.1, "embedding_lr": 0.02, "steps": 500}}
MIN_FIDELITY = 0.3
SIZE_WORD = "small"  # the photos show the concept big
PROMPT_SETS = ("small", "contexts")


def front_prompts(subject: str, prompt_set: str = "small") -> dict[str, tuple[str, dict]]:
    """tag -> (prompt, the attributes it asks for), in every unseen context (other backgrounds, left or right).
    "small": the subject asked for small, which its photos contradict; "contexts": no size asked (§4's prompts)."""
    size = f"{SIZE_WORD} " if prompt_set == "small" else ""
    return {f"{bg}|{pos}": (f"a {size}{subject} on {bg}, on the {pos}",
                            {**({"size": SIZE_WORD} if size else {}), "background": bg, "position": pos})
            for bg in experiments.CONTEXT_BACKGROUNDS for pos in experiments.CONTEXT_POSITIONS}


def settings(method: str) -> list[dict]:
    """The inference settings evaluated for one method (label, strength, beta, tau)."""
    if method == "ti":  # the word vector alone: strength 0 leaves the model untouched
        return [{"label": "textual inversion", "strength": 0.0, "beta": 0.7, "tau": TAU}]
    name = {"perfusion": "perfusion", "trained_keys": "trained keys"}[method]
    out = [{"label": f"{name} beta {beta:g}", "strength": 1.0, "beta": beta, "tau": TAU} for beta in BETAS]
    if method == "perfusion":
        out += [{"label": f"perfusion beta 0.7 tau {tau:g}", "strength": 1.0, "beta": 0.7, "tau": tau} for tau in TAUS]
    return out


def concepts_folder(ckpt_path: Path) -> Path:
    return cache.folder("front", {"ckpt": str(ckpt_path), "train": TRAIN, "methods": {m: experiments.METHODS[m]
                                  for m in METHODS}, "concept": CONCEPT, "photo_seed": experiments.PHOTO_SEED,
                                  "version": 1})


def train(runner, ckpt_name: str, folder: Path, method: str, seed: int, recipe: str = "") -> tuple[str, float | None]:
    """One concept through PerfusionTrainConcept -> PerfusionSaveConcept, once; (file name, seconds). `recipe`:
    a name of LEARNABILITY (its changes to TRAIN), or "" for TRAIN itself."""
    tag = f"{method}/seed{seed}" + (f"/{recipe.replace(' ', '_')}" if recipe else "")
    name, seconds_file = f"{tag}/{CONCEPT}_00001.safetensors", folder / f"{tag.replace('/', '_')}.seconds"
    if not (folder / name).is_file():
        t0 = time.time()
        superclass = world.CONCEPTS[CONCEPT][0]
        inputs = {**TRAIN, **LEARNABILITY.get(recipe, {}), "seed": seed, **experiments.METHODS[method]}
        runner.run(comfy_graphs.train_graph(ckpt_name, CONCEPT, superclass, experiments.PHOTO_SEED, f"{tag}/{CONCEPT}",
                                            inputs))
        seconds_file.write_text(str(time.time() - t0))
        log.info("trained %s in %.0f s", tag, time.time() - t0)
    return name, (float(seconds_file.read_text()) if seconds_file.is_file() else None)


def learnability(runner, ckpt_path: Path, judges, folder: Path, judged: Path) -> list[dict]:
    """Can this base model render the concept at all? Perfusion (seed 0) trained with the front's recipe and then,
    until one reaches MIN_FIDELITY, with LEARNABILITY's variants; each applied at beta 0.4, where fidelity is
    highest, in the unseen contexts. The concept of §6 (the pack's default of 4 micro-batches per step) is read
    too where `run.py --until gates` made it for this base. The front is sampled only if a recipe passes."""
    import folder_paths
    section6 = experiments.concepts_folder(ckpt_path) / "perfusion" / f"{CONCEPT}_00001.safetensors"
    if section6.is_file():  # the Load node finds it beside ours
        folder_paths.folder_names_and_paths["perfusion"][0].append(str(section6.parents[1]))
        folder_paths.filename_list_cache.pop("perfusion", None)

    def measured(recipe, file, seconds, changes):
        applied = [{"file": file, "strength": 1.0, "beta": 0.4, "tau": TAU}]
        row = {"recipe": recipe, "changes": changes, "training_seconds": seconds,
               **summary(evaluate(runner, ckpt_path.name, judges, f"embedding:{CONCEPT}", applied, "contexts", judged))}
        log.info("learnability: %s", row)
        return row
    rows = [measured("pack default: 4 micro-batches per step (the concept of §6)",
                     f"perfusion/{CONCEPT}_00001.safetensors", None, {"gradient_accumulation": 4})] \
        if section6.is_file() else []
    for recipe, changes in LEARNABILITY.items():
        rows.append(measured(recipe, *train(runner, ckpt_path.name, folder, "perfusion", 0, recipe), changes))
        if rows[-1]["fidelity"] >= MIN_FIDELITY:
            break
    return rows


def earlier_bases(previous_file: Path, base: str) -> list[dict]:
    """The learnability checks of other bases, from the front.json being replaced (and the ones it carried), so
    that the report keeps why the front was not sampled on them: [{"base": cache folder, "learnability": rows}]."""
    if not previous_file.is_file():
        return []
    previous = json.loads(previous_file.read_text())
    carried = [b for b in previous.get("earlier_bases", []) if b["base"] != base]
    if previous.get("base") not in (None, base) and all(b["base"] != previous["base"] for b in carried):
        carried.append({"base": previous["base"], "learnability": previous["learnability"]})
    return carried


def judge(images, want: dict, judges) -> list[dict]:
    """Per image: the concept judge's probability, and whether each asked-for attribute is read as asked."""
    attribute_judge, concept_judge = judges
    predicted = attribute_judge.predict(images)
    probability = concept_judge.probabilities(images)[CONCEPT]
    return [{"p_concept": float(probability[k]),
             **{f"{a}_ok": bool(predicted[k][a] == v) for a, v in want.items()}} for k in range(len(images))]


def evaluate(runner, ckpt_name: str, judges, subject: str, applied: list[dict] | None, prompt_set: str,
             judged: Path) -> list[dict]:
    """Sample every prompt of the set once (KSampler seeds as in experiments.SAMPLING) and judge each image;
    the judged rows are cached in `judged` (a folder per base model and judges), keyed by the rest that makes
    them."""
    prompts = front_prompts(subject, prompt_set)
    cached = judged / f"{cache.key([prompts, applied, experiments.SAMPLING])}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    runner.run(comfy_graphs.sample_graph(ckpt_name, {t: p for t, (p, _) in prompts.items()}, experiments.SAMPLING,
                                         applied))
    rows = [row for tag, (_, want) in prompts.items() for row in judge(comfy_graphs.CAPTURED.pop(tag), want, judges)]
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(rows))
    return rows


def summary(rows: list[dict]) -> dict:
    """Fidelity, detection and alignment (every asked-for attribute as asked) of judged images."""
    aligned = [all(v for k, v in r.items() if k.endswith("_ok")) for r in rows]
    out = {"fidelity": float(np.mean([r["p_concept"] for r in rows])),
           "detected": float(np.mean([r["p_concept"] > 0.5 for r in rows])),
           "alignment": float(np.mean(aligned)),
           "background_and_position": float(np.mean([r["background_ok"] and r["position_ok"] for r in rows])),
           "detected_and_aligned": float(np.mean([r["p_concept"] > 0.5 and a for r, a in zip(rows, aligned)])),
           "images": len(rows)}
    if "size_ok" in rows[0]:
        out["size"] = float(np.mean([r["size_ok"] for r in rows]))
    return out


def size_judge_on_concept(vae_path: Path, attribute_judge, n: int = 240, seed: int = 31) -> dict:
    """How well the attribute judge reads the size of the concept itself through the checkpoint's decoder (it is
    trained on world objects and random looks, never on the concepts): renders of the concept, half small."""
    import random
    import base_model
    import run
    rng = random.Random(seed)
    scenes = []
    for k in range(n):
        size, background = ("small", "big")[k % 2], rng.choice(list(world.BACKGROUNDS))
        obj = world.concept_object(CONCEPT, rng, position_word=rng.choice(list(world.POSITIONS)), size_word=size)
        scenes.append(world.Scene(background, (obj,), "", rng.uniform(-0.15, 0.15),
                                  labels=world.labels_of(background, (obj,))))
    images = base_model.reconstruct(run.load_vae(vae_path), np.stack([world.render(s) for s in scenes]))
    predicted = attribute_judge.predict(images)
    return {"images": n, "accuracy": {size: float(np.mean([p["size"] == size for p, s in zip(predicted, scenes)
                                                           if s.labels["size"] == size])) for size in world.SIZES}}


def run_front(ckpt_path: Path, judge_path: Path, vae_path: Path, out_dir: Path) -> dict:
    """Train (cached) and evaluate every method and seed on both prompt sets; front.json is rewritten after every
    seed."""
    import judges as judges_module
    folder = concepts_folder(ckpt_path)
    judged = folder / "evaluations" / judge_path.name  # judged rows depend on the judges as well
    experiments._setup(ckpt_path, folder)
    runner = comfy_graphs.Runner()
    judges = judges_module.load_judges(judge_path)
    t0 = time.time()
    superclass = world.CONCEPTS[CONCEPT][0]
    results = {"concept": CONCEPT, "train": TRAIN, "sampling": experiments.SAMPLING, "seeds": list(SEEDS),
               "prompts": {name: [p for p, _ in front_prompts(f"embedding:{CONCEPT}", name).values()]
                           for name in PROMPT_SETS},
               "size_judge_on_concept": size_judge_on_concept(vae_path, judges[0]),
               "superclass": {name: summary(evaluate(runner, ckpt_path.name, judges, superclass, None, name, judged))
                              for name in PROMPT_SETS},
               "training_seconds": {}, "rows": []}
    log.info("front: size judge on the concept %s; superclass %s", results["size_judge_on_concept"],
             results["superclass"])
    results["earlier_bases"] = earlier_bases(out_dir / "front.json", ckpt_path.parent.name)
    results["learnability"] = learnability(runner, ckpt_path, judges, folder, judged)
    recipe = next((r["recipe"] for r in results["learnability"] if r["fidelity"] >= MIN_FIDELITY
                   and r["recipe"] in LEARNABILITY), None)
    results["recipe"] = recipe
    if recipe is None:
        log.warning("front: no recipe reaches fidelity %.2f on this base model; the front is not sampled", MIN_FIDELITY)
        results["seconds"] = time.time() - t0
        (out_dir / "front.json").write_text(json.dumps(results, indent=1))
        return results
    for seed in SEEDS:
        for method in METHODS:
            file, seconds = train(runner, ckpt_path.name, folder, method, seed, recipe)
            results["training_seconds"][f"{method}/seed{seed}"] = seconds
            for setting in settings(method):
                applied = [{"file": file, "strength": setting["strength"], "beta": setting["beta"],
                            "tau": setting["tau"]}]
                for prompt_set in PROMPT_SETS:
                    rows = evaluate(runner, ckpt_path.name, judges, f"embedding:{CONCEPT}", applied, prompt_set, judged)
                    results["rows"].append({"method": method, "seed": seed, "prompts": prompt_set, **setting,
                                            **summary(rows)})
                    log.info("front: %s", results["rows"][-1])
        results["seconds"] = time.time() - t0
        (out_dir / "front.json").write_text(json.dumps(results, indent=1))
    return results


# ----------------------------------------------------------------------------------------------------------
# Analysis: every comparison per training seed, then mean and 95% interval over seeds (t, n - 1 degrees of
# freedom), and Fisher's exact test on the images pooled over seeds (which treats images as independent).

MEASURES = ("fidelity", "detected", "alignment", "size", "background_and_position", "detected_and_aligned")


def mean_interval(values) -> dict:
    """Mean and 95% t interval of per-seed values."""
    from scipy import stats
    values = np.asarray(values, dtype=float)
    half = (stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
            if len(values) > 1 else float("nan"))
    return {"mean": float(values.mean()), "low": float(values.mean() - half), "high": float(values.mean() + half),
            "per_seed": [float(v) for v in values]}


def fisher(rate_a: float, images_a: int, rate_b: float, images_b: int) -> float:
    """Two-sided p of Fisher's exact test that two image counts (rate x images) share one rate."""
    from scipy import stats
    a, b = round(rate_a * images_a), round(rate_b * images_b)
    return float(stats.fisher_exact([[a, images_a - a], [b, images_b - b]])[1])


def interpolate(curve: list[tuple[float, float]], x: float) -> float | None:
    """y at x on a curve of (x, y) points, linear between the neighbours in x; None outside its range."""
    curve = sorted(curve)
    for (xa, ya), (xb, yb) in zip(curve, curve[1:]):
        if xa <= x <= xb:
            return ya if xb == xa else ya + (yb - ya) * (x - xa) / (xb - xa)
    return None


def _rows(results, method, seed=None, beta_sweep=False):
    return [r for r in results["rows"] if r["method"] == method and (seed is None or r["seed"] == seed)
            and (not beta_sweep or r["tau"] == TAU)]


def settings_table(results: dict) -> list[dict]:
    """Each setting: every measure as mean and interval over seeds, and the images pooled over seeds."""
    out = []
    for method in METHODS:
        for setting in settings(method):
            rows = [r for r in _rows(results, method) if r["label"] == setting["label"]]
            if rows:
                out.append({**setting, "method": method, "seeds": len(rows), "images": sum(r["images"] for r in rows),
                            **{m: mean_interval([r[m] for r in rows]) for m in MEASURES if m in rows[0]}})
    return out


def knob(results: dict, method: str = "perfusion") -> dict:
    """Does beta trace a front? Between the sweep's ends (lowest and highest beta): the fall of fidelity and the
    rise of alignment, per seed (interval over seeds), and Fisher's test on the pooled images for both."""
    seeds = sorted({r["seed"] for r in _rows(results, method)})
    ends = {}
    for seed in seeds:
        sweep = sorted(_rows(results, method, seed, beta_sweep=True), key=lambda r: r["beta"])
        ends[seed] = (sweep[0], sweep[-1])
    low = [lo for lo, _ in ends.values()]
    high = [hi for _, hi in ends.values()]
    pooled = lambda rows, m: (float(np.mean([r[m] for r in rows])), sum(r["images"] for r in rows))  # noqa: E731
    return {"method": method, "betas": [low[0]["beta"], high[0]["beta"]],
            "fidelity_fall": mean_interval([lo["fidelity"] - hi["fidelity"] for lo, hi in zip(low, high)]),
            "detected_fall": mean_interval([lo["detected"] - hi["detected"] for lo, hi in zip(low, high)]),
            "alignment_rise": mean_interval([hi["alignment"] - lo["alignment"] for lo, hi in zip(low, high)]),
            "detected_fisher_p": fisher(*pooled(low, "detected"), *pooled(high, "detected")),
            "alignment_fisher_p": fisher(*pooled(low, "alignment"), *pooled(high, "alignment"))}


def equal_fidelity(results: dict, other: str) -> dict:
    """Locked keys against `other` (trained_keys: its beta sweep; ti: its one point) at equal fidelity, per seed:
    the alignment of each interpolated along its beta sweep at fidelities both reach (5 levels across the
    overlap; for a single point, at its fidelity), locked minus other, averaged over the levels. Seeds whose
    fidelities do not overlap are left out and counted."""
    differences, missing = [], []
    for seed in sorted({r["seed"] for r in results["rows"]}):
        locked = [(r["fidelity"], r["alignment"]) for r in _rows(results, "perfusion", seed, beta_sweep=True)]
        theirs = [(r["fidelity"], r["alignment"]) for r in _rows(results, other, seed, beta_sweep=True)]
        lo = max(min(x for x, _ in locked), min(x for x, _ in theirs))
        hi = min(max(x for x, _ in locked), max(x for x, _ in theirs))
        levels = [lo] if len(theirs) == 1 else np.linspace(lo, hi, 5) if lo < hi else []
        pairs = [(interpolate(locked, x), interpolate(theirs, x) if len(theirs) > 1 else theirs[0][1]) for x in levels]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if pairs:
            differences.append(float(np.mean([a - b for a, b in pairs])))
        else:
            missing.append(seed)
    return {"other": other, "alignment_difference": mean_interval(differences) if differences else None,
            "seeds_without_overlap": missing}


def nearest_setting_test(table: list[dict], other_label: str) -> dict:
    """The locked-keys setting nearest in mean fidelity to `other_label`, and Fisher's test of their alignment
    and of their joint success (detected and aligned) on the images pooled over seeds."""
    other = next(s for s in table if s["label"] == other_label)
    locked = min((s for s in table if s["method"] == "perfusion"),
                 key=lambda s: abs(s["fidelity"]["mean"] - other["fidelity"]["mean"]))
    test = lambda m: fisher(locked[m]["mean"], locked["images"], other[m]["mean"], other["images"])  # noqa: E731
    return {"locked": locked["label"], "other": other_label, "alignment_p": test("alignment"),
            "detected_and_aligned_p": test("detected_and_aligned")}


def analyse(results: dict, prompt_set: str) -> dict:
    """Every comparison of the report, on the rows of one prompt set."""
    results = {"rows": [r for r in results["rows"] if r["prompts"] == prompt_set]}
    table = settings_table(results)
    best = {method: max((s for s in table if s["method"] == method),
                        key=lambda s: s["detected_and_aligned"]["mean"])["label"] for method in METHODS}
    return {"table": table, "knob": knob(results), "knob_trained_keys": knob(results, "trained_keys"),
            "vs_trained_keys": equal_fidelity(results, "trained_keys"), "vs_ti": equal_fidelity(results, "ti"),
            "nearest_trained_keys": nearest_setting_test(table, "trained keys beta 0.7"),
            "nearest_ti": nearest_setting_test(table, "textual inversion"), "best_joint": best}

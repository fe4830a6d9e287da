"""The experiments, all through ComfyUI's executor and the pack's nodes (see REPORT.md for what they show).

1. base: the base model follows its prompts (attribute judges vs the prompt, on KSampler generations).
2. concepts: each held-out concept trained from 4 photos (PerfusionTrainConcept) three ways: Perfusion with
   locked keys (the pack's default), Perfusion with trained keys, textual inversion (word vector only).
3. contexts: the concepts generated in contexts never shown (other backgrounds, left/right); fidelity (concept
   judge) and alignment (attribute judges), swept over beta (and tau) at inference.
4. two concepts in one image (PerfusionCombineConcepts), and a concept next to a world object.
"""
from __future__ import annotations

import json
import logging
import dataclasses
import random
import sys
import time
from pathlib import Path

import numpy as np

import cache
import comfy_graphs
import judges as judges_module
import world

log = logging.getLogger(__name__)

SAMPLING = {"seed": 1000, "steps": 16, "cfg": 4.0, "sampler": "dpmpp_2m", "scheduler": "karras", "batch": 3}
# The toy world's deviations from the pack's training recipe (REPORT.md says why); every other input of the train
# node keeps its default, the recipe of perfusion_ops/train.py (TrainSettings), recorded as results["recipe"].
TRAIN = {"steps": 250, "seed": 0, "batch_size": 2, "resolution": world.SIZE}
PHOTO_SEED = 7
METHODS = {"perfusion": {"train_values": True, "train_keys": False},       # key-locked (the pack's default)
           "trained_keys": {"train_values": True, "train_keys": True},     # ablation
           "ti": {"train_values": False, "train_keys": False}}             # textual inversion baseline
BETAS = [0.4, 0.7, 1.0, 1.2]
TAUS = [0.05, 0.3]          # at beta 0.7 (locked keys)
CONTEXT_BACKGROUNDS = ["grass", "sky", "night", "brick"]   # the concept photos show only sand and snow
CONTEXT_POSITIONS = ["left", "right"]                        # the concept photos show only the centre
BASE_PROMPTS, BASE_TWO_OBJECT_PROMPTS = 96, 16
COMPANIONS = [("red", "square"), ("blue", "triangle"), ("yellow", "square"), ("purple", "triangle")]


def _setup(ckpt_path: Path, concepts_dir: Path):
    import folder_paths
    pack = __import__("comfy_env").boot_with_pack()
    comfy_graphs.register_nodes()
    folder_paths.add_model_folder_path("checkpoints", str(ckpt_path.parent), is_default=True)
    folder_paths.folder_names_and_paths["perfusion"] = ([str(concepts_dir)], {".safetensors"})
    folder_paths.folder_names_and_paths["perfusion_covariance"] = ([str(cache.root() / "covariance")], {".safetensors"})
    for name in ("checkpoints", "perfusion", "perfusion_covariance"):
        folder_paths.filename_list_cache.pop(name, None)
    return pack


def prefill_covariance(pack, ckpt_name: str) -> dict:
    """The covariance cache entry the train node would estimate ('estimate from this CLIP'), computed with the
    exact context shortcut (base_model.ContextEncoder) instead of 4000 runs of the 12-layer CLIP; checked
    against the pack's own estimator on the first 32 captions."""
    import safetensors.torch
    import nodes
    import base_model
    cov = sys.modules[pack.__name__ + ".perfusion_ops.covariance"]
    _, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)[:3]
    corpus = cov.load_corpus()
    fingerprint = cov.text_encoder_fingerprint(clip, corpus)
    path = cache.root() / "covariance" / f"{fingerprint}.safetensors"
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        return json.loads(info_path.read_text())
    shortcut = lambda captions: base_model.shortcut_covariance(clip, captions, cov)  # noqa: E731
    t0 = time.time()
    reference = cov.estimate_covariance(clip, corpus[:32])
    check = float((shortcut(corpus[:32]) - reference).norm() / reference.norm())
    C = shortcut(corpus)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"covariance": C.float().contiguous()}, str(path),
                                metadata={"perfusion.fingerprint": fingerprint, "captions": str(len(corpus))})
    info = {"fingerprint": fingerprint, "relative_difference_vs_pack_estimator_32_captions": check,
            "seconds": time.time() - t0}
    info_path.write_text(json.dumps(info))
    log.info("covariance %s prefilled: %s", fingerprint, info)
    return info


def _images(tag):
    return comfy_graphs.CAPTURED.pop(tag)


# ----------------------------------------------------------------------------------------------------------
# 1. Base model


def base_prompts(seed: int = 500):
    rng = random.Random(seed)
    single = []
    for _ in range(BASE_PROMPTS):
        obj = world._world_object(rng)
        bg = rng.choice(list(world.BACKGROUNDS))
        single.append((world.caption_for((obj,), bg, None, full=True),
                       {"background": bg, "position": obj.position_word, "shape": obj.shape,
                        "colour": obj.colour_word, "size": obj.size_word}))
    two = []
    for _ in range(BASE_TWO_OBJECT_PROMPTS):
        objs = (world._world_object(rng, "first"), world._world_object(rng, "second"))
        bg = rng.choice(list(world.BACKGROUNDS))
        two.append((world.caption_for(objs, bg, None, full=True), {"background": bg, "count": "2"}))
    return single, two


def run_base(runner, ckpt_name, attribute_judge, batch=2):
    single, two = base_prompts()
    prompts = {f"base{i}": text for i, (text, _) in enumerate(single + two)}
    runner.run(comfy_graphs.sample_graph(ckpt_name, prompts, {**SAMPLING, "batch": batch}))
    rows, examples = [], []
    for i, (text, want) in enumerate(single + two):
        images = _images(f"base{i}")
        preds = attribute_judge.predict(images)
        for k, p in enumerate(preds):
            rows.append({"prompt": text, "two": i >= len(single),
                         **{f"{a}_ok": p[a] == v for a, v in want.items()}})
        if i < 24 or (i >= len(single) and i < len(single) + 8):
            examples.append((text, images[0]))
    attrs = ["background", "position", "shape", "colour", "size"]
    ones = [r for r in rows if not r["two"]]
    twos = [r for r in rows if r["two"]]
    summary = {f"{a}_rate": float(np.mean([r[f"{a}_ok"] for r in ones])) for a in attrs}
    summary["all_five_rate"] = float(np.mean([all(r[f"{a}_ok"] for a in attrs) for r in ones]))
    summary["background_and_position_rate"] = float(np.mean([r["background_ok"] and r["position_ok"] for r in ones]))
    summary["chance"] = {"background": 1 / 6, "position": 1 / 3, "shape": 1 / 4, "colour": 1 / 6, "size": 1 / 2,
                         "all_five": 1 / (6 * 3 * 4 * 6 * 2)}
    summary["two_object_background_rate"] = float(np.mean([r["background_ok"] for r in twos]))
    summary["two_object_count_rate"] = float(np.mean([r["count_ok"] for r in twos]))
    summary["images"] = {"single": len(ones), "two_objects": len(twos)}
    return summary, examples


# ----------------------------------------------------------------------------------------------------------
# 2. Concepts


def train_concepts(runner, ckpt_name, concepts_dir: Path, methods, train: dict = TRAIN) -> dict:
    """Train every (method, concept) through the nodes once with the recipe `train` (changes to the train node's
    defaults); returns {method: {concept: file name}} and times."""
    import folder_paths
    files, times = {}, {}
    for method in methods:
        flags = METHODS[method]
        for concept, (superclass, _) in sorted(world.CONCEPTS.items()):
            name = f"{method}/{concept}_00001.safetensors"
            if not (concepts_dir / name).is_file():
                t0 = time.time()
                graph = comfy_graphs.train_graph(ckpt_name, concept, superclass, PHOTO_SEED, f"{method}/{concept}",
                                                 {**train, **flags})
                runner.run(graph)
                times[f"{method}/{concept}"] = time.time() - t0
                log.info("trained %s/%s in %.0f s", method, concept, times[f"{method}/{concept}"])
                (concepts_dir / f"{method}_{concept}.seconds").write_text(str(times[f"{method}/{concept}"]))
            else:
                seconds = concepts_dir / f"{method}_{concept}.seconds"
                times[f"{method}/{concept}"] = float(seconds.read_text()) if seconds.is_file() else None
            files.setdefault(method, {})[concept] = name
    folder_paths.filename_list_cache.pop("perfusion", None)
    return {"files": files, "seconds": times}


def context_prompts(concept: str) -> dict[str, tuple[str, dict]]:
    return {f"{concept}|{bg}|{pos}": (f"a embedding:{concept} on {bg}, on the {pos}", {"background": bg, "position": pos})
            for bg in CONTEXT_BACKGROUNDS for pos in CONTEXT_POSITIONS}


def superclass_prompts(concept: str) -> dict[str, tuple[str, dict]]:
    shape = world.CONCEPTS[concept][0]
    return {f"{concept}|{bg}|{pos}": (f"a {shape} on {bg}, on the {pos}", {"background": bg, "position": pos})
            for bg in CONTEXT_BACKGROUNDS for pos in CONTEXT_POSITIONS}


def evaluate_config(runner, ckpt_name, judges, concept_files: dict | None, strength, beta, tau, prompts_of=context_prompts):
    """Fidelity and alignment of one inference setting over both concepts and all context prompts."""
    attribute_judge, concept_judge = judges
    per_image, examples = [], {}
    for concept in sorted(world.CONCEPTS):
        prompts = prompts_of(concept)
        applied = None if concept_files is None else [{"file": concept_files[concept], "strength": strength,
                                                       "beta": beta, "tau": tau}]
        runner.run(comfy_graphs.sample_graph(ckpt_name, {t: p for t, (p, _) in prompts.items()}, SAMPLING, applied))
        for tag, (text, want) in prompts.items():
            images = _images(tag)
            preds = attribute_judge.predict(images)
            probs = concept_judge.probabilities(images)[concept]
            for k in range(len(images)):
                per_image.append({"concept": concept, "prompt": text, "p_concept": float(probs[k]),
                                  "background_ok": preds[k]["background"] == want["background"],
                                  "position_ok": preds[k]["position"] == want["position"]})
            examples.setdefault(concept, []).append((text, images[0]))
    return _summarise(per_image), examples


def _summarise(rows):
    out = {"fidelity": float(np.mean([r["p_concept"] for r in rows])),
           "detected": float(np.mean([r["p_concept"] > 0.5 for r in rows])),
           "alignment": float(np.mean([r["background_ok"] and r["position_ok"] for r in rows])),
           "background": float(np.mean([r["background_ok"] for r in rows])),
           "position": float(np.mean([r["position_ok"] for r in rows])),
           "images": len(rows)}
    for concept in sorted({r["concept"] for r in rows}):
        sub = [r for r in rows if r["concept"] == concept]
        out[concept] = {"fidelity": float(np.mean([r["p_concept"] for r in sub])),
                        "alignment": float(np.mean([r["background_ok"] and r["position_ok"] for r in sub]))}
    return out


def sweep_settings(method: str) -> list[tuple]:
    """(label, method, strength, beta, tau) of every inference setting evaluated for `method`."""
    if method == "superclass":
        return [("base model, superclass word", "superclass", 0.0, 0.0, 0.0)]
    if method == "ti":
        return [("textual inversion", "ti", 0.0, 0.7, 0.15)]
    if method == "perfusion_tau":
        return [(f"perfusion beta 0.7 tau {tau:g}", "perfusion", 1.0, 0.7, tau) for tau in TAUS]
    name = {"perfusion": "perfusion", "trained_keys": "trained keys"}[method]
    return [(f"{name} beta {beta:g} tau 0.15", method, 1.0, beta, 0.15) for beta in BETAS]


def run_sweep(runner, ckpt_name, judges, files, method, results: list, examples: dict):
    for label, kind, strength, beta, tau in sweep_settings(method):
        t0 = time.time()
        concept_files = None if kind == "superclass" else files[kind]
        prompts_of = superclass_prompts if kind == "superclass" else context_prompts
        summary, ex = evaluate_config(runner, ckpt_name, judges, concept_files, strength, beta, tau, prompts_of)
        summary.update(label=label, method=kind, strength=strength, beta=beta, tau=tau, seconds=time.time() - t0)
        results.append(summary)
        examples[label] = ex
        log.info("%s: fidelity %.3f detected %.3f alignment %.3f (%.0f s)", label, summary["fidelity"],
                 summary["detected"], summary["alignment"], summary["seconds"])


# ----------------------------------------------------------------------------------------------------------
# 4. Two concepts


def run_two_concepts(runner, ckpt_name, judges, files, beta=0.7, tau=0.15):
    attribute_judge, concept_judge = judges
    a, b = sorted(world.CONCEPTS)  # tw_circle, tw_star
    results, examples = [], {}
    for method in ("perfusion", "trained_keys", "ti"):
        strength = 0.0 if method == "ti" else 1.0
        applied = [{"files": [files[method][a], files[method][b]], "strength": strength, "beta": beta, "tau": tau}]
        prompts = {}
        for bg in CONTEXT_BACKGROUNDS:
            prompts[f"two|{bg}|ab"] = (f"a embedding:{a} and a embedding:{b} on {bg}", {"background": bg, "both": True})
            prompts[f"two|{bg}|ba"] = (f"a embedding:{b} and a embedding:{a} on {bg}", {"background": bg, "both": True})
        for (colour, shape), bg in zip(COMPANIONS, CONTEXT_BACKGROUNDS):
            for concept in (a, b):
                prompts[f"comp|{concept}|{bg}"] = (f"a embedding:{concept} and a {colour} {shape} on {bg}",
                                                   {"background": bg, "concept": concept})
        t0 = time.time()
        runner.run(comfy_graphs.sample_graph(ckpt_name, {t: p for t, (p, _) in prompts.items()}, SAMPLING, applied))
        rows = []
        for tag, (text, want) in prompts.items():
            images = _images(tag)
            preds = attribute_judge.predict(images)
            probs = concept_judge.probabilities(images)
            for k in range(len(images)):
                row = {"kind": tag.split("|")[0], "background_ok": preds[k]["background"] == want["background"],
                       "two_objects": preds[k]["count"] == "2", "p_a": float(probs[a][k]), "p_b": float(probs[b][k])}
                if "concept" in want:
                    row["p_target"] = float(probs[want["concept"]][k])
                rows.append(row)
            examples.setdefault(method, []).append((text, images[0]))
        two = [r for r in rows if r["kind"] == "two"]
        comp = [r for r in rows if r["kind"] == "comp"]
        results.append({
            "method": method, "beta": beta, "tau": tau, "seconds": time.time() - t0,
            "two_concepts": {
                "images": len(two),
                f"{a}_detected": float(np.mean([r["p_a"] > 0.5 for r in two])),
                f"{b}_detected": float(np.mean([r["p_b"] > 0.5 for r in two])),
                "both_detected": float(np.mean([r["p_a"] > 0.5 and r["p_b"] > 0.5 for r in two])),
                "background": float(np.mean([r["background_ok"] for r in two])),
                "two_objects": float(np.mean([r["two_objects"] for r in two])),
                "both_and_background": float(np.mean([r["p_a"] > 0.5 and r["p_b"] > 0.5 and r["background_ok"]
                                                      for r in two]))},
            "with_companion": {
                "images": len(comp),
                "concept_detected": float(np.mean([r["p_target"] > 0.5 for r in comp])),
                "background": float(np.mean([r["background_ok"] for r in comp])),
                "two_objects": float(np.mean([r["two_objects"] for r in comp]))}})
        log.info("two concepts, %s: %s", method, results[-1])
    return results, examples


# ----------------------------------------------------------------------------------------------------------


def concepts_folder(ckpt_path: Path, train: dict = TRAIN) -> Path:
    return cache.folder("concepts", {"ckpt": str(ckpt_path), "train": train, "methods": METHODS,
                                     "photo_seed": PHOTO_SEED, "text_encoder": "float32", "version": 3})  # 3: recipe and corpus of issues 15/16


def add_gate_inputs(ckpt_path: Path, out_dir: Path) -> None:
    """results.json gains the gate inputs of the trained concepts (cheap: no sampling)."""
    results = json.loads((out_dir / "results.json").read_text())
    folder = concepts_folder(ckpt_path)
    files = {method: {name: folder / file for name, file in by_concept.items()}
             for method, by_concept in results["concepts"]["files"].items()}
    results["gate_inputs"] = gate_inputs(ckpt_path, files)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))


def run_all(ckpt_path: Path, judge_folder: Path, out_dir: Path):
    """Everything, in order of priority; results.json and the figures are rewritten after every part, so a
    cut-short run still leaves what it measured."""
    import report
    start = time.time()
    timings = {}
    concepts_dir = concepts_folder(ckpt_path)
    pack = _setup(ckpt_path, concepts_dir)
    ckpt_name = ckpt_path.name
    attribute_judge, concept_judge = judges_module.load_judges(judge_folder)
    judges = (attribute_judge, concept_judge)
    runner = comfy_graphs.Runner()
    recipe = dataclasses.asdict(sys.modules[pack.__name__ + ".perfusion_ops.train"].TrainSettings())
    results = {"sampling": SAMPLING, "train": TRAIN, "recipe": recipe, "methods": METHODS, "photo_seed": PHOTO_SEED,
               "timings": timings, "judges": json.loads((judge_folder / "stats.json").read_text()),
               "concepts": {"files": {}, "seconds": {}}, "sweeps": [], "two_concepts": []}
    examples = {"base": [], "sweeps": {}, "two": {}}

    def save(part, t0):
        timings[part] = timings.get(part, 0.0) + time.time() - t0
        timings["experiments_total"] = time.time() - start
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
        report.write_figures(out_dir / "figures", results, examples["base"], examples["sweeps"], examples["two"])
        log.info("saved results after %s (%.0f s in all)", part, timings["experiments_total"])

    def train(methods):
        trained = train_concepts(runner, ckpt_name, concepts_dir, methods)
        for method, files in trained["files"].items():
            results["concepts"]["files"][method] = files
        results["concepts"]["seconds"].update(trained["seconds"])

    t0 = time.time()
    results["covariance"] = prefill_covariance(pack, ckpt_name)
    timings["covariance"] = time.time() - t0
    t0 = time.time()
    results["base"], examples["base"] = run_base(runner, ckpt_name, attribute_judge)
    log.info("base model follows prompts: %s", results["base"])
    save("base_eval", t0)
    files = results["concepts"]["files"]
    for part, methods, sweeps in (("perfusion_and_ti", ["perfusion", "ti"], ["superclass", "ti", "perfusion"]),
                                  ("trained_keys", ["trained_keys"], ["trained_keys"]),
                                  ("tau", [], ["perfusion_tau"])):
        t0 = time.time()
        train(methods)
        timings["concept_training"] = timings.get("concept_training", 0.0) + time.time() - t0
        t1 = time.time()
        for method in sweeps:
            run_sweep(runner, ckpt_name, judges, files, method, results["sweeps"], examples["sweeps"])
        timings["sweeps"] = timings.get("sweeps", 0.0) + time.time() - t1
        save(part, t0)
    t0 = time.time()
    results["two_concepts"], examples["two"] = run_two_concepts(runner, ckpt_name, judges, files)
    save("two_concepts", t0)
    return results


def gate_inputs(ckpt_path: Path, files: dict) -> list[dict]:
    """r = uᵀx / uᵀi* of each concept's own token in the evaluation prompts, and its gate at each swept beta
    (tau 0.15). The gate is designed for r near 1 on the concept token; r far from 1 makes the beta/tau knob
    idle (gate shut or saturated). Exact for this text encoder: the token's context is LayerNorm(e + position)
    (base_model.ContextEncoder), the same for every prompt up to the position embedding."""
    import torch
    import comfy.sd
    import base_model
    pack = __import__("comfy_env").boot_with_pack()
    read_concept = sys.modules[pack.__name__ + ".perfusion_ops.concept_file"].read_concept
    own_gate_input = sys.modules[pack.__name__ + ".perfusion_ops.train"].own_gate_input
    clip = comfy.sd.load_checkpoint_guess_config(str(ckpt_path), output_vae=False)[1]
    encoder = base_model.ContextEncoder(clip)
    rows = []
    for method, by_concept in files.items():
        for name, path in sorted(by_concept.items()):
            concept = read_concept(path)
            e = concept.embeddings["clip_l"][0].float()
            rs = []
            for position in range(1, 11):  # where the concept's token can sit in the world's prompts
                x = torch.nn.functional.layer_norm(e + encoder.positions[position], (e.shape[-1],),
                                                   encoder.norm_weight, encoder.norm_bias, encoder.eps)
                rs.append(own_gate_input(x, concept.i_star, concept.u))
            r = rs[1]  # position 2: `a embedding:<name> ...`, the evaluation prompts
            rows.append({"method": method, "concept": name, "r": r, "r_min": min(rs), "r_max": max(rs),
                         "gate": {str(b): float(torch.sigmoid(torch.tensor((r - b) / 0.15))) for b in BETAS}})
    return rows

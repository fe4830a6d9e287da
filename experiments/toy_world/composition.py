"""Two concepts in one prompt, without sampling (issue 20, first step; REPORT.md §7).

For every token of the composition prompts (both concepts; a concept next to a world object), each concept's
gate input r_a, gate g_a and removal coefficient α_a (docs/method.md §1-§2, perfusion_ops/rank1.py), under the
combined patch in exact and approximate mode, against each concept applied alone. A concept's gate g_a depends
only on that concept, so combining can change a token's edit only through α (exact mode: α = G⁻¹ s instead of
α_a = r_a) and through the other concept's own gate opening on it. If both are small on every token, the
multi-concept path does to each token what the single concepts do, and a composition failure lies elsewhere (the
operating point or locking, which the sampled steps of issue 20 separate).

    nice -n 10 ~/.cache/comfyui-perfusion/venv/bin/python experiments/toy_world/run.py --until composition

Then, sampled (`--until companions`, needs the judges): the companion prompts (a concept next to a world object)
with each concept applied alone and with the combined set, at both betas, local and global key-locking. The
concept judge reads whether the concept is in the image: if a concept alone fails as the combined set does, the
multi-concept path is cleared; if it recovers at the lower beta, it is the operating point; if it fails at both,
it is locking (or the world).
"""
from __future__ import annotations

import importlib
import json
import logging
import re
import time
from pathlib import Path

import comfy_graphs
import experiments
import front
import world

log = logging.getLogger(__name__)
BETAS = (0.4, 0.7)  # the paper's range for global locking, and the default
TAU = 0.15
# The concepts' recipe: §8's strongest (one micro-batch per step, learning rates x3.3, 500 steps), with masks.
# On the patch-code base, §6's recipe (experiments.TRAIN) and §8's strongest without masks both left the concepts
# unrendered even alone (the control), with their two i* alike (cosine 0.95 and 0.81). With 1000 steps the star
# was still not rendered (companions_1000_steps.json, composition_1000_steps.json).
TRAIN = {**front.TRAIN, **front.LEARNABILITY["learning rates x3.3 and 500 steps"], "masks": True}


def composition_prompts(a: str, b: str) -> dict[str, list[str]]:
    """The prompts of the toy world's composition experiment (experiments.run_two_concepts)."""
    two = [f"a embedding:{x} and a embedding:{y} on {bg}" for bg in experiments.CONTEXT_BACKGROUNDS
           for x, y in ((a, b), (b, a))]
    companion = [f"a embedding:{concept} and a {colour} {shape} on {bg}"
                 for (colour, shape), bg in zip(experiments.COMPANIONS, experiments.CONTEXT_BACKGROUNDS)
                 for concept in (a, b)]
    return {"two concepts": two, "concept and world object": companion}


def token_rows(clip, concepts: list, prompt: str, leak, rank1, torch) -> list[dict]:
    """Per token (BOS..EOS): which word it is (a concept's or another), every concept's r, and α alone (= r,
    also combined approximate) and combined exact (α = G⁻¹ s). The prompt is encoded once for all concepts."""
    names = [c.name for c in concepts]
    order = re.findall(r"embedding:(\w+)", prompt)  # word-vector positions come in the order of the prompt
    context, positions = leak.prompt_context(clip, prompt)
    u, energy, gram = rank1.metric_gram(torch.stack([c.i_star for c in concepts]),
                                        torch.stack([c.u for c in concepts]))
    s = context @ u.T                                                          # s_a = u_aᵀ x (unit u)
    r = s / energy                                                             # [tokens, k]
    alpha_exact = s @ torch.linalg.inv(gram).T                                 # α = G⁻¹ s, row by row
    words = {position: order[i] for i, position in enumerate(positions)}
    chunk = next(iter(clip.tokenize(prompt).values()))[0]
    tokenizer = clip.tokenizer.clip_l.tokenizer  # the world's CLIP-L (Hugging Face CLIPTokenizer)
    where = lambda t: ("BOS" if t == 0 else "EOS" if t == r.shape[0] - 1 else  # noqa: E731
                       tokenizer.decode([chunk[t][0]]) if isinstance(chunk[t][0], int) else "concept")
    return [{"word": words.get(t, "other"), "where": where(t), "r": r[t].tolist(),
             "alpha_exact": alpha_exact[t].tolist(), "alpha_alone": r[t].tolist(), "names": names}
            for t in range(r.shape[0])]


def with_gates(rows: list[dict], beta: float, rank1, torch) -> list[dict]:
    """The rows with each concept's gate g = σ((r − β)/τ) at this beta."""
    return [{**row, "g": rank1.gate(torch.tensor(row["r"]), beta, TAU).tolist()} for row in rows]


def summarise(rows: list[dict], names: list[str]) -> list[dict]:
    """Per kind of token (each concept's word, the other tokens): means of r, g and α per concept, and the
    largest change combining makes to a token's coefficients (|α exact − α alone|, and g of the other concept)."""
    out = []
    for word in names + ["other"]:
        picked = [row for row in rows if row["word"] == word]
        if not picked:
            continue
        mean = lambda key, a: sum(row[key][a] for row in picked) / len(picked)  # noqa: E731
        out.append({
            "word": word, "tokens": len(picked),
            "per_concept": {name: {"r": mean("r", a), "g": mean("g", a), "alpha_exact": mean("alpha_exact", a)}
                            for a, name in enumerate(names)},
            "max_alpha_change": max(abs(row["alpha_exact"][a] - row["alpha_alone"][a])
                                    for row in picked for a in range(len(names))),
            "max_gate": [max(row["g"][a] for row in picked) for a in range(len(names))],
            # where on the prompt that largest gate is (BOS, EOS or a word), per concept
            "max_gate_at": [max(picked, key=lambda row: row["g"][a])["where"] for a in range(len(names))]})
    return out


def _ops(pack, name: str):
    """The pack's perfusion_ops module `name`, as the host loaded it."""
    return importlib.import_module(f"{pack.__name__}.perfusion_ops.{name}")


def run_composition(ckpt_path: Path, out_dir: Path) -> dict:
    import comfy.sd
    import torch
    concepts_dir = experiments.concepts_folder(ckpt_path, TRAIN)
    pack = experiments._setup(ckpt_path, concepts_dir)
    concept_file, leak, rank1, text = (_ops(pack, n) for n in ("concept_file", "leak", "rank1", "text"))
    t0 = time.time()
    trained = experiments.train_concepts(comfy_graphs.Runner(), ckpt_path.name, concepts_dir, ["perfusion"], TRAIN)
    a, b = sorted(world.CONCEPTS)
    concepts = [concept_file.read_concept(concepts_dir / trained["files"]["perfusion"][name]) for name in (a, b)]
    clip = comfy.sd.load_checkpoint_guess_config(str(ckpt_path), output_vae=False)[1]
    concept_clip = text.clip_with_concepts(clip, concepts)
    _, energy, gram = rank1.metric_gram(torch.stack([c.i_star for c in concepts]),
                                        torch.stack([c.u for c in concepts]))
    results = {"concepts": [a, b], "tau": TAU, "train": TRAIN, "training_seconds": trained["seconds"],
               # G_ab / sqrt(G_aa G_bb): how alike the two concepts look in the metric of C (0: exact = approximate)
               "metric_cosine": float(gram[0, 1] / (gram[0, 0] * gram[1, 1]).sqrt()),
               "metric_cosine_ba": float(gram[1, 0] / (gram[0, 0] * gram[1, 1]).sqrt()), "by_beta": {}}
    # Plain cosines of the stored vectors: did the two words learn one thing, did each leave its superclass?
    cosine = lambda x, y: float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=0))  # noqa: E731
    results["i_star_cosine"] = cosine(concepts[0].i_star, concepts[1].i_star)
    results["i_star_vs_superclass"] = {c.name: cosine(c.i_star, c.i_super) for c in concepts}
    prompts = composition_prompts(a, b)
    rows = {kind: [row for prompt in texts for row in token_rows(concept_clip, concepts, prompt, leak, rank1, torch)]
            for kind, texts in prompts.items()}
    for beta in BETAS:
        results["by_beta"][str(beta)] = {kind: summarise(with_gates(kind_rows, beta, rank1, torch), [a, b])
                                         for kind, kind_rows in rows.items()}
    results["prompts"] = prompts
    results["seconds"] = time.time() - t0
    (out_dir / "composition.json").write_text(json.dumps(results, indent=1))
    log.info("composition: %s", json.dumps(results)[:2000])
    return results


def run_companions(ckpt_path: Path, judge_path: Path, out_dir: Path) -> dict:
    """The sampled companion prompts for the concepts of each training seed (front.SEEDS, issue 20 item 4);
    companions.json is rewritten after every seed."""
    import judges
    attribute_judge, concept_judge = judges.load_judges(judge_path)
    results = {"sampling": experiments.SAMPLING, "tau": TAU, "train": TRAIN, "seeds": list(front.SEEDS),
               "cross_r": {}, "training_seconds": {}, "rows": [], "seconds": 0.0}
    for seed in front.SEEDS:
        train = {**TRAIN, "seed": seed}
        concepts_dir = experiments.concepts_folder(ckpt_path, train)
        pack = experiments._setup(ckpt_path, concepts_dir)
        runner = comfy_graphs.Runner()  # a fresh executor: each seed's concept files have the same names
        trained = experiments.train_concepts(runner, ckpt_path.name, concepts_dir, ["perfusion"], train)
        files = trained["files"]["perfusion"]
        t0 = time.time()
        cross_r = cross_gate_inputs(pack, {name: concepts_dir / files[name] for name in sorted(files)})
        rows = _companion_rows(runner, ckpt_path.name, files, cross_r, attribute_judge, concept_judge)
        results["cross_r"][str(seed)] = cross_r
        results["training_seconds"][str(seed)] = trained["seconds"]
        results["rows"] += [{"seed": seed, **row} for row in rows]
        results["seconds"] += time.time() - t0
        (out_dir / "companions.json").write_text(json.dumps(results, indent=1))
    return results


def _companion_rows(runner, ckpt_name: str, files: dict, cross_r: dict, attribute_judge, concept_judge) -> list[dict]:
    """Every key-locking and beta: the companion prompts with each concept applied alone and with the combined
    set, the control, both concepts in one prompt, and the other concept's gate kept off."""
    a, b = sorted(files)
    rows = []
    for locking in ("local", "global"):
        for beta in BETAS:
            for applied in ([a], [b], [a, b]):
                spec = {"files": [files[name] for name in applied], "strength": 1.0, "beta": beta, "tau": TAU,
                        "key_locking": locking}
                prompts = {f"companion|{concept}|{bg}": (f"a embedding:{concept} and a {colour} {shape} on {bg}",
                                                         concept, bg)
                           for (colour, shape), bg in zip(experiments.COMPANIONS, experiments.CONTEXT_BACKGROUNDS)
                           for concept in applied}
                if len(applied) == 1:  # the control: the concept alone in the prompt, on the same backgrounds
                    prompts.update({f"alone|{applied[0]}|{bg}": (f"a embedding:{applied[0]} on {bg}", applied[0], bg)
                                    for bg in experiments.CONTEXT_BACKGROUNDS})
                else:  # the composition itself: both concepts in one prompt, in both orders
                    prompts.update({f"two|{x}+{y}|{bg}": (f"a embedding:{x} and a embedding:{y} on {bg}", "+".join(applied),
                                                          bg)
                                    for bg in experiments.CONTEXT_BACKGROUNDS for x, y in (applied, applied[::-1])})
                runner.run(comfy_graphs.sample_graph(ckpt_name, {t: p for t, (p, _, _) in prompts.items()},
                                                     experiments.SAMPLING, [spec]))
                setting = {"locking": locking, "beta": beta, "applied": "+".join(applied)}
                for kind, prompt in (("companion", "with a world object"), ("alone", "concept only")):
                    for concept in applied:
                        batches = [(comfy_graphs.CAPTURED.pop(tag), bg) for tag, (_, wanted, bg) in prompts.items()
                                   if wanted == concept and tag.startswith(kind + "|")]
                        if batches:
                            rows.append(_detection_row({**setting, "prompt": prompt}, concept, batches,
                                                       attribute_judge, concept_judge))
                rows += _two_concept_rows(prompts, setting, applied, attribute_judge, concept_judge)
            rows += _other_gate_kept_off_rows(runner, ckpt_name, files, cross_r, locking, beta,
                                              attribute_judge, concept_judge)
    return rows


def cross_gate_inputs(pack, paths: dict) -> dict:
    """{"a|b": concept a's gate input at b's trained encoding}, r_ab = u_aᵀ i*_b / E_a, what the apply node's
    warning reads (patch.warn_about_crossed_gates)."""
    import torch
    concepts = [_ops(pack, "concept_file").read_concept(path) for path in paths.values()]
    _, energy, gram = _ops(pack, "rank1").metric_gram(torch.stack([c.i_star for c in concepts]),
                                               torch.stack([c.u for c in concepts]))
    names = list(paths)
    return {f"{x}|{y}": float(gram[i, j] / energy[i]) for i, x in enumerate(names) for j, y in enumerate(names)
            if i != j}


def _other_gate_kept_off_rows(runner, ckpt_name, files, cross_r, locking, beta, attribute_judge, concept_judge):
    """The combined set as the apply node's warning advises: concept A at `beta`, the other concept B chained
    after it with its beta raised to r_BA + 2 tau (its gate on A's word down to sigmoid(-2) = 0.12). Read on A's
    companion prompts: if A recovers there what it loses in the plain combined set, B's gate opening on A's word
    is why it lost it."""
    rows = []
    for concept, other in (sorted(files), sorted(files)[::-1]):
        raised = round(cross_r[f"{other}|{concept}"] + 2 * TAU, 2)
        specs = [{"files": [files[concept]], "strength": 1.0, "beta": beta, "tau": TAU, "key_locking": locking},
                 {"files": [files[other]], "strength": 1.0, "beta": raised, "tau": TAU, "key_locking": locking}]
        prompts = {f"kept|{concept}|{bg}": (f"a embedding:{concept} and a {colour} {shape} on {bg}", bg)
                   for (colour, shape), bg in zip(experiments.COMPANIONS, experiments.CONTEXT_BACKGROUNDS)}
        runner.run(comfy_graphs.sample_graph(ckpt_name, {t: p for t, (p, _) in prompts.items()},
                                             experiments.SAMPLING, specs))
        setting = {"locking": locking, "beta": beta, "applied": f"{concept}+{other}", "other_beta": raised,
                   "prompt": "with a world object, other's gate kept off"}
        batches = [(comfy_graphs.CAPTURED.pop(tag), bg) for tag, (_, bg) in prompts.items()]
        rows.append(_detection_row(setting, concept, batches, attribute_judge, concept_judge))
    return rows


def _detection_row(setting: dict, concept: str, batches: list, attribute_judge, concept_judge) -> dict:
    """A row of the companions table: how often the concept judge finds `concept` in the batches [(images, the
    prompt's background)], and the attribute judge the background and two objects."""
    import numpy as np
    found = [hit for images, _ in batches for hit in concept_judge.probabilities(images)[concept] > 0.5]
    row = {**setting, "concept": concept, "images": len(found), "concept_detected": float(np.mean(found)),
           **_attribute_rates(attribute_judge, batches)}
    log.info("companions: %s", row)
    return row


def _two_concept_rows(prompts: dict, setting: dict, applied: list, attribute_judge, concept_judge) -> list[dict]:
    """Rows for the prompts with both concepts (tags "two|..."): how often the concept judge finds each concept,
    and both in the same image (concept "both")."""
    import numpy as np
    tags = [tag for tag in prompts if tag.startswith("two|")]
    if not tags:
        return []
    batches = [comfy_graphs.CAPTURED.pop(tag) for tag in tags]
    images = np.concatenate(batches)
    probabilities = concept_judge.probabilities(images)
    found = {name: probabilities[name] > 0.5 for name in applied}
    found["both"] = np.logical_and.reduce([found[name] for name in applied])
    attributes = _attribute_rates(attribute_judge, [(batch, prompts[tag][2]) for tag, batch in zip(tags, batches)])
    rows = [{**setting, "prompt": "both concepts", "concept": name, "images": len(images),
             "concept_detected": float(np.mean(hits)), **attributes}
            for name, hits in found.items()]
    for row in rows:
        log.info("companions: %s", row)
    return rows


def _attribute_rates(attribute_judge, batches: list) -> dict:
    """The share of images in which the attribute judge reads the prompt's background, and two objects;
    batches [(images, the prompt's background)]."""
    import numpy as np
    predicted = [(p, bg) for images, bg in batches for p in attribute_judge.predict(images)]
    return {"background": float(np.mean([p["background"] == bg for p, bg in predicted])),
            "two_objects": float(np.mean([p["count"] == "2" for p, _ in predicted]))}

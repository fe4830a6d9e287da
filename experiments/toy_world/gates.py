"""Gate calibration of the toy world's Perfusion concepts, without sampling (issues 15 and 16; REPORT.md):

- the spectrum of C on the world's CLIP-L, the corpus before vocabulary tails against the shipped one;
- each concept trained by the train node with today's recipe (gradient accumulation, the file's i* from the
  finished word) and the shipped corpus: its recorded gate_input (r of its word in prompts it was not trained on);
- on held-out world prompts, the leak (share of the other tokens whose gate opens at the default beta/tau) and the
  concept's own r and gate, with u = C⁻¹ i* from the shipped corpus's C and, for comparison, from the old one.

    nice -n 10 ~/.cache/comfyui-perfusion/venv/bin/python experiments/toy_world/run.py --until gates
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import sys
import time
from pathlib import Path

import comfy_graphs
import world

log = logging.getLogger(__name__)
BACKGROUNDS = ["grass", "sand", "snow", "sky", "night", "brick"]
COMPANIONS = [("red", "square"), ("blue", "triangle"), ("yellow", "circle"), ("green", "star")]


def held_out_prompts(concept: str, other: str) -> list[str]:
    """World prompts the concept was not trained on: other backgrounds and positions, next to a world object, and
    next to the other concept."""
    prompts = [f"a embedding:{concept} on {bg}, on the {pos}" for bg in BACKGROUNDS for pos in ("left", "right")]
    prompts += [f"a embedding:{concept} and a {colour} {shape} on {bg}"
                for bg in BACKGROUNDS[:3] for colour, shape in COMPANIONS]
    prompts += [f"a embedding:{concept} and a embedding:{other} on {bg}" for bg in BACKGROUNDS]
    return prompts


def run_gates(ckpt_path: Path, out_dir: Path) -> dict:
    import comfy.sd
    import torch
    import base_model
    import experiments
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import make_caption_corpus
    concepts_dir = experiments.concepts_folder(ckpt_path)
    pack = experiments._setup(ckpt_path, concepts_dir)
    ops = lambda name: importlib.import_module(f"{pack.__name__}.perfusion_ops.{name}")  # noqa: E731  (as loaded)
    covariance, leak, concept_file, text, train = (ops(n) for n in ("covariance", "leak", "concept_file", "text",
                                                                     "train"))
    ckpt_name = ckpt_path.name
    results = {"recipe": dataclasses.asdict(train.TrainSettings()), "train": experiments.TRAIN}
    t0 = time.time()
    results["covariance"] = experiments.prefill_covariance(pack, ckpt_name)
    clip = comfy.sd.load_checkpoint_guess_config(str(ckpt_path), output_vae=False)[1]
    corpora = {"before": make_caption_corpus.prompts(), "shipped": covariance.load_corpus()}
    inverses, spectrum = {}, {}
    for name, corpus in corpora.items():
        C = base_model.shortcut_covariance(clip, corpus, covariance)
        eigenvalues = torch.linalg.eigvalsh(C)
        floor = covariance.RIDGE * eigenvalues.clamp_min(0).mean()
        spectrum[name] = {"near_floor_share": float((eigenvalues < 10 * floor).double().mean()),
                          "captions": len(corpus)}
        inverses[name] = covariance.inverse(C)
    results["spectrum"] = spectrum
    results["seconds_covariance"] = time.time() - t0

    t0 = time.time()
    runner = comfy_graphs.Runner()
    trained = experiments.train_concepts(runner, ckpt_name, concepts_dir, ["perfusion"])
    results["seconds_training"] = trained["seconds"]
    t0 = time.time()  # the measurement alone
    rows = []
    for concept_name, file in sorted(trained["files"]["perfusion"].items()):
        concept = concept_file.read_concept(concepts_dir / file)
        other = next(c for c in world.CONCEPTS if c != concept_name)
        other_concept = concept_file.read_concept(concepts_dir / trained["files"]["perfusion"][other])
        concept_clip = text.clip_with_concepts(clip, [concept, other_concept])
        prompts = held_out_prompts(concept_name, other)
        record = json.loads(concept.train)
        row = {"concept": concept_name, "gate_input_recorded": record.get("gate_input"), "corpora": {}}
        for corpus_name, C_inv in inverses.items():
            u = covariance.metric_vector(C_inv, concept.i_star)
            with_u = concept.replace(u=u)
            report = leak.gate_report(concept_clip, with_u, prompts)
            template_r = [leak.token_gate_inputs(concept_clip, with_u, t.format(f"embedding:{concept_name}"))
                          for t in train.TEMPLATES]
            own_template_r = [float(r[positions[0]]) for r, positions in template_r]  # mean 1 by i*'s definition
            row["corpora"][corpus_name] = {
                "leak": report.leak, "other_tokens": report.other_tokens, "own_r": report.own_r,
                "own_gate": report.own_gate, "own_r_templates": sum(own_template_r) / len(own_template_r),
                "own_r_templates_range": [min(own_template_r), max(own_template_r)],
                "leaking_examples": [(prompts[i], position, r) for i, position, r in report.leaking[:5]]}
        rows.append(row)
        log.info("gates %s: %s", concept_name, json.dumps(row))
    results["concepts"] = rows
    results["seconds_measurement_only"] = time.time() - t0
    (out_dir / "gates.json").write_text(json.dumps(results, indent=1))
    return results
